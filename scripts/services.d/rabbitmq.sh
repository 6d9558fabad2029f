# shellcheck shell=bash
# scripts/services.d/rabbitmq.sh — the native RabbitMQ node: configuration, start, provision, stop.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# RabbitMQ (native)

RMQ_DIR="$BATON_DIR/rabbitmq"
RMQ_PID_FILE="$RMQ_DIR/baton.pid"

rmq_export() { # environment shared by the server and rabbitmqctl (same HOME, so same cookie)
  export HOME="$RMQ_DIR/home"
  export RABBITMQ_NODENAME="$RMQ_NODE"
  export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
  export RABBITMQ_LOG_BASE="$LOG_DIR/rabbitmq"
  export RABBITMQ_PID_FILE="$RMQ_PID_FILE"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$AMQP_PORT"
  export RABBITMQ_DIST_PORT="$RMQ_DIST_PORT"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
  export ERL_EPMD_ADDRESS=127.0.0.1
}

rmq_ctl() { (rmq_export && cd "$RMQ_DIR" && exec "$RMQ_LIB/rabbitmqctl" -n "$RMQ_NODE" "$@") 9>&-; }

rmq_pid() { # pid of our node: from the pid file, else (still booting, pid file lost) from /proc
  local pid p args
  pid=$(head -n1 "$RMQ_PID_FILE" 2>/dev/null) || true
  if [[ -n $pid ]] && pid_alive "$pid" beam; then echo "$pid"; return 0; fi
  for p in /proc/[0-9]*; do
    [[ -r $p/comm && $(<"$p/comm") == beam.smp ]] 2>/dev/null || continue
    args=$(tr '\0' '\n' <"$p/cmdline" 2>/dev/null) || continue
    if [[ $'\n'$args$'\n' == *$'\n'"$RMQ_DIR/home"$'\n'* ]]; then echo "${p#/proc/}"; return 0; fi
  done
  return 1
}

rmq_prepare() {
  mkdir -p "$RMQ_DIR/home" "$RMQ_DIR/mnesia" "$LOG_DIR/rabbitmq"
  chmod 700 "$RMQ_DIR/home"
  # The cookie lives in $RMQ_DIR/home. As root, reuse the system one (/var/lib/rabbitmq) so that
  # Debian's `rabbitmqctl -n baton@localhost ...` (which su's to user rabbitmq) can talk to us.
  local cookie="$RMQ_DIR/home/.erlang.cookie" sys=/var/lib/rabbitmq/.erlang.cookie
  if is_root && [[ -s $sys ]]; then
    if ! cmp -s "$sys" "$cookie"; then rm -f "$cookie"; install -m 400 "$sys" "$cookie"; fi
  elif [[ ! -s $cookie ]]; then
    rm -f "$cookie"
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$cookie")
    chmod 400 "$cookie"
  fi
  : >"$RMQ_DIR/rabbitmq-env.conf"
  rmq_plugins_text >"$RMQ_DIR/enabled_plugins"
  echo "${RMQ_ADVANCED:-[].}" >"$RMQ_DIR/advanced.config"
  rmq_conf_text >"$RMQ_DIR/rabbitmq.conf"
}

# The node's configuration: the same settings as deploy/rabbitmq/rabbitmq.conf (docker). No
# default user: on a fresh node RabbitMQ creates guest, which rmq_provision deletes.
rmq_plugins_text() { echo '[rabbitmq_management].'; }
rmq_conf_text() {
  cat <<EOF
# written by $ME (the same settings as deploy/rabbitmq/rabbitmq.conf)
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
# Baton's requests are at most 64 KiB: refuse bigger messages (the default allows 128 MiB).
max_message_size = 131072
# management HTTP API (BATON_BROKER_ADMIN_URL)
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
EOF
  printf '%s' "$RMQ_CONF_EXTRA"
}
RMQ_CONF_EXTRA='' # more lines for rabbitmq.conf (the cluster's nodes), each ending in a newline
# Whether the node's files hold what this version of the script writes (if not, the node was
# started by an older version, with an older configuration, and needs a restart).
rmq_config_current() {
  [[ $(cat "$RMQ_DIR/rabbitmq.conf" 2>/dev/null) == "$(rmq_conf_text)" ]] &&
    [[ $(cat "$RMQ_DIR/enabled_plugins" 2>/dev/null) == "$(rmq_plugins_text)" ]]
}

RMQ_LAUNCHER=
rmq_launch() { # start the node in the background; rmq_await finishes the job
  rmq_prepare
  rm -f "$RMQ_PID_FILE"
  info "starting RabbitMQ node $RMQ_NODE"
  (rmq_export && cd "$RMQ_DIR" && exec setsid "$RMQ_LIB/rabbitmq-server") \
    >>"$LOG_DIR/rabbitmq-stdout.log" 2>&1 </dev/null 9>&- &
  RMQ_LAUNCHER=$!
}

rmq_await() {
  local deadline=$((SECONDS + 90))
  until [[ -s $RMQ_PID_FILE ]]; do
    if ! kill -0 "$RMQ_LAUNCHER" 2>/dev/null || ((SECONDS > deadline)); then
      tail -n 20 "$LOG_DIR/rabbitmq-stdout.log" >&2 || true
      die "RabbitMQ did not start (logs: $LOG_DIR/rabbitmq-stdout.log, $LOG_DIR/rabbitmq/)"
    fi
    sleep 0.2
  done
  if ! rmq_ctl wait "$RMQ_PID_FILE" --timeout 90 >/dev/null 2>&1; then
    tail -n 20 "$LOG_DIR/rabbitmq-stdout.log" >&2 || true
    die "RabbitMQ did not finish booting (logs: $LOG_DIR/rabbitmq-stdout.log, $LOG_DIR/rabbitmq/)"
  fi
}

# rabbitmqctl of the broker this script started: native node, or the docker compose service.
RMQ_MODE=native
broker_ctl() {
  if [[ $RMQ_MODE == docker ]]; then
    compose exec -T rabbitmq rabbitmqctl "$@" 9>&-
  else
    rmq_ctl "$@"
  fi
}

# Whether a tab-separated table on stdin (rabbitmqctl -q --no-table-headers) has a row for $1.
has_row() { awk -F '\t' -v name="$1" '$1 == name { found = 1 } END { exit !found }'; }

# Users and permissions from deploy/rabbitmq/definitions.json, then the legacy users baton
# (administrator, all permissions) and guest deleted. Idempotent: an older setup converges.
rmq_provision() {
  local defs=$RMQ_DEFINITIONS out users u missing deadline want=()
  [[ -r $defs ]] || die "missing $defs"
  if [[ $RMQ_MODE == docker ]]; then defs=$RMQ_DOCKER_DEFINITIONS; fi
  out=$(broker_ctl import_definitions "$defs" 2>&1) || die "rabbitmqctl import_definitions $defs failed: $out"
  # The import runs asynchronously: wait until every user of the file has its permissions.
  mapfile -t want < <(sed -n 's/^[[:space:]]*"user":[[:space:]]*"\([^"]*\)".*/\1/p' "$RMQ_DEFINITIONS")
  ((${#want[@]})) || die "no permissions found in $RMQ_DEFINITIONS"
  deadline=$((SECONDS + 30))
  while :; do
    out=$(broker_ctl list_permissions -q --no-table-headers -p / 2>&1) || die "rabbitmqctl list_permissions failed: $out"
    missing=
    for u in "${want[@]}"; do has_row "$u" <<<"$out" || missing+=" $u"; done
    [[ -n $missing ]] || break
    ((SECONDS < deadline)) || die "import_definitions $defs: still no permissions for$missing"
    sleep 0.5
  done
  users=$(broker_ctl list_users -q --no-table-headers 2>&1) || die "rabbitmqctl list_users failed: $users"
  for u in "${RMQ_LEGACY_USERS[@]}"; do
    if has_row "$u" <<<"$users"; then
      out=$(broker_ctl delete_user "$u" 2>&1) || die "rabbitmqctl delete_user $u failed: $out"
      info "deleted the legacy RabbitMQ user '$u'"
    fi
  done
}

# Wait for the management HTTP API (it needs user baton-admin, so after rmq_provision).
rmq_await_management() {
  ensure_curl
  wait_for 60 mgmt_local_answers ||
    die "RabbitMQ's management API does not answer on http://127.0.0.1:$MGMT_PORT (as baton-admin)"
}

# RabbitMQ 3.10.8 with the management plugin takes 5 s more to stop its application: on the way
# down, the statistics event handler of rabbitmq_management_agent waits out a 5 s call timeout.
# Removing the handler first (start_app installs it again) keeps stop_app and shutdown at under
# a second, as without the plugin. Best effort: a node without the handler just says so.
rmq_drop_stats_handler() {
  rmq_ctl eval 'gen_event:delete_handler(rabbit_event, rabbit_mgmt_db_handler, []).' >/dev/null 2>&1 || true
}

rmq_stop() {
  local pid; pid=$(rmq_pid) || return 0
  rmq_drop_stats_handler
  if ! rmq_ctl shutdown >/dev/null 2>&1; then
    kill -TERM "$pid" 2>/dev/null || true
    # shellcheck disable=SC2016
    wait_for 30 bash -c '! kill -0 "$0" 2>/dev/null' "$pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RMQ_PID_FILE"
}
