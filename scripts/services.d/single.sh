# shellcheck shell=bash
# scripts/services.d/single.sh — the single-node services: Docker or native, state, `up`, `down`, `status`, `env`.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# Docker

docker_usable() {
  [[ ${BATON_SERVICES_NO_DOCKER:-} != 1 ]] || return 1
  command -v docker >/dev/null 2>&1 || return 1
  timeout 5 docker info >/dev/null 2>&1 || return 1
  if ! timeout 10 docker compose version >/dev/null 2>&1; then
    warn "a Docker engine answers but 'docker compose' is missing; using Debian packages instead"
    return 1
  fi
}

compose() { docker compose -f "$COMPOSE_FILE" --project-directory "$REPO" "$@"; }

# ---------------------------------------------------------------------------------------------
# state of one service: external-up external-down ours foreign docker down

pg_state() {
  if ((PG_EXTERNAL)); then
    if pg_answers "$DATABASE_URL"; then echo external-up; else echo external-down; fi
  elif pg_pid >/dev/null; then echo ours
  elif pg_local_answers; then
    if [[ $(marker postgres) == docker ]]; then echo docker; else echo foreign; fi
  else echo down
  fi
}

rmq_state() {
  if ((RMQ_EXTERNAL)); then
    if amqp_answers "$AMQP_URL"; then echo external-up; else echo external-down; fi
  elif rmq_pid >/dev/null; then echo ours
  elif amqp_local_answers; then
    if [[ $(marker rabbitmq) == docker ]]; then echo docker; else echo foreign; fi
  else echo down
  fi
}

describe() { # state -> words
  case $1 in
    external-up) echo "external, reachable" ;;
    external-down) echo "external, NOT reachable" ;;
    ours) echo "running, started by $ME (native)" ;;
    docker) echo "running, started by $ME (docker compose)" ;;
    foreign) echo "running, not started by $ME" ;;
    down) echo "stopped" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_env() {
  printf 'export BATON_DATABASE_URL=%s\n' "$(sq "$DATABASE_URL")"
  printf 'export BATON_AMQP_URL=%s\n' "$(sq "$AMQP_URL")"
  # External broker and a variable not exported: left out (unset) rather than a made-up URL.
  if [[ -n $FRONTEND_AMQP_URL ]]; then printf 'export BATON_FRONTEND_AMQP_URL=%s\n' "$(sq "$FRONTEND_AMQP_URL")"; fi
  if [[ -n $OPERATOR_AMQP_URL ]]; then printf 'export BATON_OPERATOR_AMQP_URL=%s\n' "$(sq "$OPERATOR_AMQP_URL")"; fi
  if [[ -n $BROKER_ADMIN_URL ]]; then printf 'export BATON_BROKER_ADMIN_URL=%s\n' "$(sq "$BROKER_ADMIN_URL")"; fi
}

cmd_status() { # [--json]
  local ok=0 pg rmq pg_up=true rmq_up=true
  pg=$(pg_state)
  rmq=$(rmq_state)
  [[ $pg == ours || $pg == docker || $pg == foreign || $pg == external-up ]] || { ok=1; pg_up=false; }
  [[ $rmq == ours || $rmq == docker || $rmq == foreign || $rmq == external-up ]] || { ok=1; rmq_up=false; }
  case ${1:-} in
    --json)
      # One object on one line, for programs: each service's state (external-up, external-down, ours,
      # docker, foreign, down), whether it answers, and its URL without the password.
      printf '{"postgres":{"state":%s,"reachable":%s,"url":%s},"rabbitmq":{"state":%s,"reachable":%s,"url":%s},"ready":%s}\n' \
        "$(json_string "$pg")" "$pg_up" "$(json_string "$(redact "$DATABASE_URL")")" \
        "$(json_string "$rmq")" "$rmq_up" "$(json_string "$(redact "$AMQP_URL")")" "$( ((ok == 0)) && echo true || echo false)"
      ;;
    "")
      printf 'postgres: %s  %s\n' "$(describe "$pg")" "$(redact "$DATABASE_URL")"
      printf 'rabbitmq: %s  %s\n' "$(describe "$rmq")" "$(redact "$AMQP_URL")"
      ;;
    *) die "usage: $ME status [--json]" ;;
  esac
  return $ok
}

# The services listen on ports inside Linux's ephemeral range (32768-60999). While a service is down
# (a broker-stop fault, a restart), a client reconnecting to 127.0.0.1:P can be given P itself as its
# local port and connect to itself (TCP self-connect), holding P: the service then fails to start with
# eaddrinuse. As root, keep these ports out of the ephemeral range (best effort; kept with what is
# there, undone by a reboot).
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports ours="55432,55441-55449,55672-55673,55682,55771-55799" now
  [[ -w $file ]] || return 0
  now=$(cat "$file" 2>/dev/null) || return 0
  [[ $now == *55672* ]] && return 0
  echo "${now:+$now,}$ours" >"$file" 2>/dev/null || true
}

cmd_up() {
  take_lock
  mkdir -p "$LOG_DIR" "$MARK_DIR"
  reserve_ports
  pg_layout # sets globals: must run here, not inside $(pg_state)

  # External URLs: only check that they answer.
  local failed=0
  if ((PG_EXTERNAL)); then
    if wait_for "$EXTERNAL_WAIT" pg_answers "$DATABASE_URL"; then
      echo "postgres: external, reachable  $(redact "$DATABASE_URL")"
    else
      echo "postgres: external, NOT reachable after ${EXTERNAL_WAIT}s  $(redact "$DATABASE_URL")" >&2
      failed=1
    fi
  fi
  if ((RMQ_EXTERNAL)); then
    if wait_for "$EXTERNAL_WAIT" amqp_answers "$AMQP_URL"; then
      echo "rabbitmq: external, reachable  $(redact "$AMQP_URL")"
    else
      echo "rabbitmq: external, NOT reachable after ${EXTERNAL_WAIT}s  $(redact "$AMQP_URL")" >&2
      failed=1
    fi
  fi
  ((failed == 0)) || die "external service(s) not reachable; unset the variable(s) to use local ones"

  local pg=skip rmq=skip
  ((PG_EXTERNAL)) || pg=$(pg_state)
  ((RMQ_EXTERNAL)) || rmq=$(rmq_state)

  local to_start=()
  [[ $pg == down ]] && to_start+=(postgres)
  [[ $rmq == down ]] && to_start+=(rabbitmq)

  if ((${#to_start[@]})) && docker_usable; then
    ensure_packages
    info "docker compose up -d --wait ${to_start[*]}"
    compose up -d --wait "${to_start[@]}" 9>&- >&2 || die "docker compose up failed"
    local s
    for s in "${to_start[@]}"; do set_marker "$s" docker; done
    [[ $pg == down ]] && pg=docker-new
    [[ $rmq == down ]] && rmq=docker-new
  else
    local natives=()
    [[ $pg == down ]] && natives+=(pg)
    [[ $rmq == down ]] && natives+=(rmq)
    ensure_packages "${natives[@]}"
    # RabbitMQ boots in ~5 s: let it do so while PostgreSQL is initialised and started.
    if [[ $rmq == down ]]; then rmq_launch; fi
    if [[ $pg == down ]]; then pg_start; set_marker postgres native; pg=native-new; fi
    if [[ $pg == ours || $pg == native-new ]]; then pg_provision; fi
    if [[ $rmq == down ]]; then
      rmq_await; set_marker rabbitmq native; rmq=native-new
    fi
  fi

  # RabbitMQ started by this script (now or before): bring it to the current configuration,
  # users and permissions, then wait for its management API.
  case $rmq in
    ours)
      if ! rmq_config_current; then
        info "RabbitMQ node $RMQ_NODE runs with an older configuration of $ME: restarting it"
        rmq_stop; rmq_launch; rmq_await; rmq=native-restarted
      fi
      ;;
    docker)
      # applies changes of docker-compose.yml (recreates the container only when it changed)
      if docker_usable; then
        compose up -d --wait rabbitmq 9>&- >&2 || die "docker compose up rabbitmq failed"
      else
        warn "RabbitMQ was started with docker compose but Docker does not answer: not provisioned"
        rmq=docker-unmanaged
      fi
      ;;
  esac
  case $rmq in
    native-new | native-restarted | ours) RMQ_MODE=native; rmq_provision; rmq_await_management ;;
    docker-new | docker) RMQ_MODE=docker; rmq_provision; rmq_await_management ;;
    foreign) mgmt_local_answers || warn "RabbitMQ's management API does not answer on 127.0.0.1:$MGMT_PORT" ;;
  esac

  local url
  url=$(redact "$DATABASE_URL")
  case $pg in
    native-new) echo "postgres: started (native PostgreSQL $PG_VERSION_STARTED, data $PG_DATA)  $url" ;;
    docker-new) echo "postgres: started (docker compose)  $url" ;;
    ours | docker | foreign) echo "postgres: already $(describe "$pg"), reused  $url" ;;
  esac
  url=$(redact "$AMQP_URL")
  case $rmq in
    native-new) echo "rabbitmq: started (native node $RMQ_NODE)  $url" ;;
    native-restarted) echo "rabbitmq: restarted with the new configuration (native node $RMQ_NODE)  $url" ;;
    docker-new) echo "rabbitmq: started (docker compose)  $url" ;;
    ours | docker | foreign) echo "rabbitmq: already $(describe "$rmq"), reused  $url" ;;
    docker-unmanaged) echo "rabbitmq: already $(describe docker), reused (not provisioned)  $url" ;;
  esac
  case $rmq in
    native-* | docker-new | ours | docker) echo "rabbitmq: management API answers  $(redact "$DEFAULT_BROKER_ADMIN_URL")" ;;
  esac

  # Final check: both must answer.
  if ((!PG_EXTERNAL)) && ! wait_for 30 pg_local_answers; then die "postgres on 127.0.0.1:$PG_PORT does not answer"; fi
  if ((!RMQ_EXTERNAL)) && ! wait_for 30 amqp_local_answers; then die "rabbitmq on 127.0.0.1:$AMQP_PORT does not answer"; fi
}

cmd_down() {
  take_lock
  local s
  # PostgreSQL
  if ((PG_EXTERNAL)); then
    echo "postgres: external, left alone  $(redact "$DATABASE_URL")"
  elif pg_pid >/dev/null; then
    pg_stop || die "pg_ctl stop failed (data $PG_DATA)"
    clear_marker postgres
    echo "postgres: stopped"
  elif [[ $(marker postgres) == docker ]]; then
    if docker_usable; then compose rm -s -f postgres 9>&- >&2; fi
    clear_marker postgres
    echo "postgres: stopped (docker compose)"
  else
    clear_marker postgres
    if pg_local_answers; then echo "postgres: running, not started by $ME: left alone"; else echo "postgres: not running"; fi
  fi
  # RabbitMQ
  if ((RMQ_EXTERNAL)); then
    echo "rabbitmq: external, left alone  $(redact "$AMQP_URL")"
  elif rmq_pid >/dev/null; then
    rmq_stop
    clear_marker rabbitmq
    echo "rabbitmq: stopped"
  elif [[ $(marker rabbitmq) == docker ]]; then
    if docker_usable; then compose rm -s -f rabbitmq 9>&- >&2; fi
    clear_marker rabbitmq
    echo "rabbitmq: stopped (docker compose)"
  else
    clear_marker rabbitmq
    if amqp_local_answers; then echo "rabbitmq: running, not started by $ME: left alone"; else echo "rabbitmq: not running"; fi
  fi
}
