# shellcheck shell=bash
# scripts/services.d/cluster.sh — the three-node RabbitMQ cluster and the PostgreSQL pair, and their faults.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# A three-node RabbitMQ cluster on this machine (issue 11): `cluster up|down|status|env`.
# Nodes baton-c1..c3@localhost, AMQP 55771-55773, management 55781-55783, distribution
# 55791-55793, state in .baton/cluster/rabbit-N. Quorum queues declared on it get a replica on
# every node. Independent of the single node of `up`, which may run at the same time.

CLUSTER_DIR="$BATON_DIR/cluster"
CLUSTER_SIZE=3

cluster_node() { # i: point the RabbitMQ globals at cluster node i (call in a subshell)
  local i=$1
  RMQ_DIR="$CLUSTER_DIR/rabbit-$i"
  RMQ_PID_FILE="$RMQ_DIR/baton.pid"
  RMQ_NODE="baton-c$i@localhost"
  AMQP_PORT=$((55770 + i))
  MGMT_PORT=$((55780 + i))
  RMQ_DIST_PORT=$((55790 + i))
  RMQ_MODE=native
  # A node unreachable for about net_ticktime (4 s here: 3-5 s; 60 s by default) counts as down; the
  # minority side of a partition pauses itself (RabbitMQ's advice for 3+ nodes). A node that was frozen (SIGSTOP)
  # past the tick does not see itself in a minority when it resumes, and the cluster stays
  # partitioned until that node's application restarts: `cluster heal`. (autoheal, tried too,
  # restarted the majority side instead, and one of its nodes hung in boot.)
  RMQ_CONF_EXTRA='# a node of the cluster of scripts/services cluster
cluster_partition_handling = pause_minority
net_ticktime = 4
'
  # Quorum queues elect a new leader when aten, Ra's failure detector, suspects the leader's node: it
  # polls every 5 s by default (a frozen leader's queues were re-elected after about 9 s), every 1 s
  # here (about 2 s). RabbitMQ 3.10 has no rabbitmq.conf key for it (3.11+:
  # raft.adaptive_failure_detector.poll_interval, as deploy/rabbitmq/cluster.conf sets).
  # docs/operations.md, "A frozen broker node".
  RMQ_ADVANCED='[{aten, [{poll_interval, 1000}]}].'
}

cluster_urls() { # user:password: the nodes' AMQP URLs, comma-separated, in node order
  local i urls=()
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do urls+=("amqp://$1@127.0.0.1:$((55770 + i))/%2F"); done
  (IFS=,; echo "${urls[*]}")
}

cluster_running_nodes() { # the node names node 1 reports as running
  (cluster_node 1 && rmq_ctl eval 'rabbit_nodes:all_running().' 2>/dev/null) | tr -d "[]' \n" | tr ',' ' '
}

# The PostgreSQL pair: servers 1 and 2 (ports 55441-55442, data in <postgres location>/../cluster/pg-N,
# that is .baton/cluster/pg-N). One is the primary (its number is in .baton/cluster/pg-primary), the
# other a streaming standby made with pg_basebackup from it. Replication is synchronous
# (synchronous_standby_names = '*', synchronous_commit = on: a commit returns once the standby has
# flushed it) unless .baton/cluster/pg-replication says async (`cluster db-sync off`, for the chaos
# run's negative control).
CLUSTER_PG_SIZE=2

cluster_pg() { # i: point the PostgreSQL globals at cluster server i (call in a subshell)
  if [[ -z $PG_CLUSTER ]]; then pg_layout; PG_ROOT=${PG_BASE%/postgres}; fi # .baton, or /tmp/baton-<hash>
  PG_CLUSTER=$1
  PG_BASE="$PG_ROOT/cluster/pg-$1"
  PG_DATA="$PG_BASE/data"
  PG_SOCK="$PG_BASE/run"
  if [[ $PG_BASE == "$BATON_DIR"/* ]]; then PG_LOG="$LOG_DIR/cluster-pg-$1.log"; else PG_LOG="$PG_BASE/postgres.log"; fi
  PG_PORT=$((55440 + $1))
  # Each server names the other as its synchronous standby, and streams from it when it is a standby
  # itself (standby.signal): the settings do not change when the roles swap.
  local other=$((3 - $1)) names
  names="'baton_pg_$other'"
  if [[ $(cluster_pg_replication) == async ]]; then names="''"; fi
  PG_CONF_EXTRA="# a server of the pair of scripts/services cluster
synchronous_standby_names = $names
synchronous_commit = on
hot_standby = on
wal_keep_size = '512MB'
# A standby whose primary died polls for WAL every 5 s by default, and notices a promotion only then.
wal_retrieve_retry_interval = '200ms'
primary_conninfo = 'host=$PG_ROOT/cluster/pg-$other/run port=$((55440 + other)) user=postgres application_name=baton_pg_$1'"
}
cluster_pg_replication() { cat "$CLUSTER_DIR/pg-replication" 2>/dev/null || echo sync; }
cluster_pg_primary() { cat "$CLUSTER_DIR/pg-primary" 2>/dev/null || echo 1; }
cluster_pg_sql() { # sql: one value from the server the globals point at (empty when it does not answer)
  "$(pg_bin_for_data)/psql" -X -q -At -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres -c "$1" 2>/dev/null
}

cluster_pg_start() { # start server $PG_CLUSTER as it is (primary or standby)
  local bin; bin=$(pg_bin_for_data)
  # A server killed by `db-failover` may stay a zombie for a while (nothing reaps it in some
  # containers); PostgreSQL would take its lock files for a live server's.
  as_pg rm -f "$PG_DATA/postmaster.pid" "$PG_SOCK/.s.PGSQL.$PG_PORT.lock"
  pg_launch "$bin"
}

# Makes server i a standby of server p: a fresh pg_basebackup (its old data, if any, is removed).
cluster_pg_rebuild() { # i p
  local bin out psock pport
  psock=$(cluster_pg "$2" && echo "$PG_SOCK"); pport=$((55440 + $2))
  cluster_pg "$1"
  bin=$(pg_bin_dir) || die "no PostgreSQL server binaries"
  if pg_pid >/dev/null; then as_pg "$bin/pg_ctl" -D "$PG_DATA" -m immediate -w -s stop || true; fi
  if [[ -d $PG_BASE ]]; then as_pg rm -rf "$PG_DATA"; fi
  mkdir -p "$PG_BASE"
  if is_root; then chown postgres:postgres "$PG_BASE"; fi
  as_pg mkdir -p "$PG_SOCK"
  info "pg_basebackup of server $2 into $PG_DATA (a standby of server $2)"
  # (its own application_name: the copy's WAL stream must not count as the synchronous standby)
  if ! out=$(as_pg "$bin/pg_basebackup" -d "host=$psock port=$pport user=postgres application_name=baton_pg_$1_copy" \
    -D "$PG_DATA" -X stream -c fast 2>&1); then
    printf '%s\n' "$out" >&2
    die "pg_basebackup from server $2 failed"
  fi
  as_pg touch "$PG_DATA/standby.signal"
  cluster_pg_start
}

cluster_pg_wait_standby() { # p: until the primary p streams to its standby (sync when so configured)
  local state=streaming
  if [[ $(cluster_pg_replication) == sync ]]; then state=sync; fi
  (
    cluster_pg "$1"
    # shellcheck disable=SC2016
    wait_for 60 bash -c '[[ $("$0" -X -q -At -h "$1" -p "$2" -U postgres -d postgres -c "$3" 2>/dev/null) == 1 ]]' \
      "$(pg_bin_for_data)/psql" "$PG_SOCK" "$PG_PORT" \
      "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND ('$state' = 'streaming' OR sync_state = 'sync')" ||
      die "server $1 has no $state standby after 60 s (logs: $LOG_DIR/cluster-pg-*.log)"
  )
}

cmd_cluster_pg_up() {
  ensure_packages pg
  local p s
  p=$(cluster_pg_primary); s=$((3 - p))
  (
    cluster_pg "$p"
    if ! pg_pid >/dev/null; then
      [[ ! -f $PG_DATA/standby.signal ]] || die "server $p ($PG_DATA) is a standby but .baton/cluster/pg-primary names it the primary"
      pg_init "$(pg_bin_for_data)"
      cluster_pg_start
    fi
  )
  (
    cluster_pg "$s"
    if pg_pid >/dev/null; then exit 0; fi
    if [[ -f $PG_DATA/standby.signal ]]; then
      cluster_pg_start
    else
      cluster_pg_rebuild "$s" "$p"
    fi
  )
  cluster_pg_wait_standby "$p"
  # (after the standby: with synchronous replication a commit waits for it)
  (cluster_pg "$p" && pg_provision)
}

cmd_cluster_up() {
  take_lock
  reserve_ports
  ensure_packages rmq
  local i cookie launched=()
  # Launch every node that is down before waiting for any: a node that was not the last to stop
  # waits for its peers at boot, so they must come up together.
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    if (cluster_node "$i" && rmq_pid >/dev/null); then
      (cluster_node "$i" && kill -CONT "$(rmq_pid)") # in case a chaos run left it paused
      if ! (cluster_node "$i" && rmq_config_current); then
        warn "baton-c$i@localhost runs with an older configuration: '$ME cluster down' and 'up' again to apply it"
      fi
      continue
    fi
    (
      cluster_node "$i"
      mkdir -p "$RMQ_DIR/home"
      if ((i > 1)); then
        # One cookie for the whole cluster: node 1's.
        cookie="$CLUSTER_DIR/rabbit-1/home/.erlang.cookie"
        if ! cmp -s "$cookie" "$RMQ_DIR/home/.erlang.cookie"; then
          rm -f "$RMQ_DIR/home/.erlang.cookie"
          install -m 400 "$cookie" "$RMQ_DIR/home/.erlang.cookie"
        fi
      fi
      rmq_launch
    )
    launched+=("$i")
    # Node 1 makes the cookie the others copy.
    if ((i == 1)); then wait_for 30 test -s "$CLUSTER_DIR/rabbit-1/home/.erlang.cookie" || die "no cookie for the cluster"; fi
  done
  for i in "${launched[@]}"; do cluster_node_await "$i"; done
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    (cluster_node "$i" && rmq_ctl start_app >/dev/null 2>&1) || true # in case a chaos run left its app stopped
  done
  for ((i = 2; i <= CLUSTER_SIZE; i++)); do
    if [[ " $(cluster_running_nodes) " != *" baton-c$i@localhost "* ]]; then
      (
        cluster_node "$i"
        info "joining $RMQ_NODE to baton-c1@localhost"
        # (rabbitmqctl prints transient errors about the joining node's tracking tables; its status tells.)
        rmq_ctl stop_app >/dev/null 2>&1
        rmq_ctl reset >/dev/null 2>&1
        out=$(rmq_ctl join_cluster baton-c1@localhost 2>&1) || die "rabbitmqctl join_cluster failed for $RMQ_NODE: $out"
        rmq_ctl start_app >/dev/null 2>&1
        rmq_ctl await_startup >/dev/null 2>&1 || die "$RMQ_NODE did not start after joining the cluster"
      )
    fi
  done
  wait_for 240 cluster_whole || die "the RabbitMQ cluster is not whole after 240 s: $(cluster_running_nodes) running"
  (cluster_node 1 && rmq_provision)
  cmd_cluster_pg_up
  set_marker cluster native
  cmd_cluster_status
}

cluster_node_await() { # i: until node i has booted
  (
    cluster_node "$1"
    wait_for 90 test -s "$RMQ_PID_FILE" || die "$RMQ_NODE did not start (logs: $LOG_DIR/rabbitmq-stdout.log, $LOG_DIR/rabbitmq/)"
    rmq_ctl wait "$RMQ_PID_FILE" --timeout 300 >/dev/null 2>&1 ||
      die "$RMQ_NODE did not finish booting (logs: $LOG_DIR/rabbitmq-stdout.log, $LOG_DIR/rabbitmq/)"
  )
}

cmd_cluster_down() {
  take_lock
  local i bin
  for ((i = CLUSTER_SIZE; i >= 1; i--)); do
    (
      cluster_node "$i"
      if rmq_pid >/dev/null; then kill -CONT "$(rmq_pid)"; rmq_stop; echo "cluster: $RMQ_NODE stopped"; else echo "cluster: $RMQ_NODE not running"; fi
    )
  done
  for ((i = 1; i <= CLUSTER_PG_SIZE; i++)); do
    (
      cluster_pg "$i"
      if pg_pid >/dev/null; then
        bin=$(pg_bin_for_data)
        as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop
        echo "cluster: PostgreSQL server $i stopped"
      else
        echo "cluster: PostgreSQL server $i not running"
      fi
    )
  done
  clear_marker cluster
}

cmd_cluster_status() {
  local i pid rss running role
  running=$(cluster_running_nodes)
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    (
      cluster_node "$i"
      if pid=$(rmq_pid); then
        rss=$(awk '/^VmRSS:/ { printf "%d MiB", $2 / 1024 }' "/proc/$pid/status" 2>/dev/null)
        if [[ " $running " == *" $RMQ_NODE "* ]]; then state="running, in the cluster"; else state="running, not in the cluster"; fi
        echo "cluster: $RMQ_NODE $state (AMQP 127.0.0.1:$AMQP_PORT, management $MGMT_PORT, ${rss:-? MiB})"
      else
        echo "cluster: $RMQ_NODE not running"
      fi
    )
  done
  for ((i = 1; i <= CLUSTER_PG_SIZE; i++)); do
    (
      cluster_pg "$i"
      if pid=$(pg_pid); then
        # the whole server: the postmaster and its children
        rss=$(for p in $pid $(pgrep -P "$pid"); do awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null; done | awk '{ s += $1 } END { printf "%d MiB", s / 1024 }')
        case $(cluster_pg_sql 'SELECT pg_is_in_recovery()') in
          t) role="standby, $(cluster_pg_sql "SELECT status FROM pg_stat_wal_receiver")" ;;
          f) role="primary, replication $(cluster_pg_replication), standbys: $(cluster_pg_sql "SELECT coalesce(string_agg(application_name || ' ' || state || ' ' || sync_state, ', '), 'none') FROM pg_stat_replication")" ;;
          *) role="not answering" ;;
        esac
        echo "cluster: PostgreSQL server $i running, $role (127.0.0.1:$PG_PORT, $rss)"
      else
        echo "cluster: PostgreSQL server $i not running"
      fi
    )
  done
  echo "cluster: BATON_AMQP_URL=$(cluster_urls 'baton-worker:********')"
  echo "cluster: BATON_DATABASE_URL=$(cluster_database_url 'baton:********')"
}

cluster_database_url() { echo "postgres://$1@127.0.0.1:55441,127.0.0.1:55442/baton?sslmode=disable&target_session_attrs=read-write"; }

cmd_cluster_env() {
  echo "export BATON_DATABASE_URL=$(sq "$(cluster_database_url baton:baton)")"
  echo "export BATON_AMQP_URL=$(sq "$(cluster_urls baton-worker:baton-worker)")"
  echo "export BATON_FRONTEND_AMQP_URL=$(sq "$(cluster_urls baton-frontend:baton-frontend)")"
  echo "export BATON_OPERATOR_AMQP_URL=$(sq "$(cluster_urls baton-operator:baton-operator)")"
  echo "export BATON_BROKER_ADMIN_URL=$(sq "http://baton-admin:baton-admin@127.0.0.1:55781")"
}

# ---- faults for `baton chaos --cluster` (each prints one line on stdout)

cluster_check_node() { [[ $1 =~ ^[1-3]$ ]] || die "cluster node '$1' is not allowed: use 1, 2 or 3"; }

cmd_cluster_node() { # action i
  local action=$1 i=${2:-}
  cluster_check_node "$i"
  (
    cluster_node "$i"
    local pid
    case $action in
      kill) pid=$(rmq_pid) || die "$RMQ_NODE does not run"; kill -KILL "$pid"; rm -f "$RMQ_PID_FILE"; echo "killed $RMQ_NODE (pid $pid)" ;;
      start)
        if rmq_pid >/dev/null; then echo "$RMQ_NODE already runs"; exit 0; fi
        rmq_launch
        cluster_node_await "$i"
        echo "started $RMQ_NODE" ;;
      stop-app) rmq_drop_stats_handler; rmq_ctl stop_app >/dev/null || die "rabbitmqctl stop_app failed on $RMQ_NODE"; echo "stopped the application of $RMQ_NODE" ;;
      start-app) rmq_ctl start_app >/dev/null || die "rabbitmqctl start_app failed on $RMQ_NODE"; echo "started the application of $RMQ_NODE" ;;
      pause) pid=$(rmq_pid) || die "$RMQ_NODE does not run"; kill -STOP "$pid"; echo "paused $RMQ_NODE (pid $pid)" ;;
      resume) pid=$(rmq_pid) || die "$RMQ_NODE does not run"; kill -CONT "$pid"; echo "resumed $RMQ_NODE (pid $pid)" ;;
      *) die "cluster node action '$action' is not allowed: use kill, start, stop-app, start-app, pause or resume" ;;
    esac
  )
}

cluster_whole() { # every node runs its application and sees every node running
  local i
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    (
      cluster_node "$i"
      [[ $(rmq_ctl -q eval 'rabbit:is_running().' 2>/dev/null) == true ]] &&
        [[ $(rmq_ctl -q eval 'length(rabbit_nodes:all_running()).' 2>/dev/null) == "$CLUSTER_SIZE" ]]
    ) || return 1
  done
}

# Until the cluster is whole (every node runs and sees every other), at most $1 seconds (default 240).
cmd_cluster_wait() {
  local t0=$SECONDS limit=${1:-240}
  [[ $limit =~ ^[0-9]+$ ]] || die "cluster wait: '$limit' is not a number of seconds"
  wait_for "$limit" cluster_whole || die "the RabbitMQ cluster is not whole after $limit s"
  echo "all $CLUSTER_SIZE broker nodes run and see each other (waited $((SECONDS - t0)) s)"
}

# Restarts the application of every node that does not see the whole cluster (what an operator does
# after a partition that pause_minority did not resolve), then waits for the cluster to be whole.
cmd_cluster_heal() {
  local i restarted=()
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    if ! (
      cluster_node "$i"
      [[ $(rmq_ctl -q eval 'rabbit:is_running().' 2>/dev/null) == true ]] &&
        [[ $(rmq_ctl -q eval 'length(rabbit_nodes:all_running()).' 2>/dev/null) == "$CLUSTER_SIZE" ]]
    ); then
      (
        cluster_node "$i"
        rmq_drop_stats_handler
        rmq_ctl stop_app >/dev/null 2>&1 || true
        rmq_ctl start_app >/dev/null 2>&1 || die "rabbitmqctl start_app failed on $RMQ_NODE"
      )
      restarted+=("$i")
    fi
  done
  cmd_cluster_wait 120 >/dev/null
  if ((${#restarted[@]})); then echo "healed: restarted the application of node(s) ${restarted[*]}"; else echo "healed: nothing to do"; fi
}

# Which node leads a quorum queue: `cluster queue-leader VHOST QUEUE` prints its number (1-3), asking
# the first node that answers.
cmd_cluster_queue_leader() { # vhost queue [--json]: the number of the node that leads the queue
  local vhost=${1:-} queue=${2:-} json=${3:-} i out leader
  [[ -n $vhost && -n $queue && ( -z $json || $json == --json ) ]] || die "usage: $ME cluster queue-leader VHOST QUEUE [--json]"
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    out=$(cluster_node "$i" && rmq_ctl -q list_queues -p "$vhost" --no-table-headers name leader 2>/dev/null) || continue
    leader=$(awk -F '\t' -v q="$queue" '$1 == q { print $2 }' <<<"$out")
    if [[ $leader =~ ^baton-c([1-3])@ ]]; then
      if [[ -n $json ]]; then printf '{"node":%s,"name":%s}\n' "${BASH_REMATCH[1]}" "$(json_string "$leader")"; else echo "${BASH_REMATCH[1]}"; fi
      return 0
    fi
  done
  die "no node knows the leader of queue '$queue' in virtual host '$vhost'"
}

# SIGKILL of the primary (the postmaster and every child at once, like a power cut), then
# `pg_ctl promote` of the standby. Prints the replication lag seen just before the kill.
cmd_cluster_db_failover() {
  take_lock
  local p s pid lag bin t0 t1
  p=$(cluster_pg_primary); s=$((3 - p))
  lag=$(cluster_pg "$p" && cluster_pg_sql "SELECT coalesce(string_agg(format('standby=%s state=%s sync=%s unsent_bytes=%s unflushed_bytes=%s flush_lag=%s', application_name, state, sync_state, pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn), pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), coalesce(flush_lag::text, '0')), '; '), 'no standby') FROM pg_stat_replication")
  pid=$(cluster_pg "$p" && pg_pid) || die "PostgreSQL server $p (the primary) does not run"
  kill -STOP "$pid"
  # shellcheck disable=SC2046
  kill -KILL "$pid" $(pgrep -P "$pid") 2>/dev/null || true
  t0=${EPOCHREALTIME/./}
  (
    cluster_pg "$s"
    bin=$(pg_bin_for_data)
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -w -t 60 -s promote || die "pg_ctl promote of server $s failed"
  )
  t1=${EPOCHREALTIME/./}
  echo "$s" >"$CLUSTER_DIR/pg-primary"
  printf 'killed primary %s; promoted server %s in %d ms; replication %s; before the kill: %s\n' \
    "$p" "$s" $(((t1 - t0) / 1000)) "$(cluster_pg_replication)" "$lag"
}

# The old primary comes back as a standby of the new one (a fresh base backup).
cmd_cluster_db_rejoin() {
  take_lock
  local p s
  p=$(cluster_pg_primary); s=$((3 - p))
  if (cluster_pg "$s" && pg_pid >/dev/null && [[ -f $PG_DATA/standby.signal ]]); then echo "server $s is already a standby"; return 0; fi
  cluster_pg_rebuild "$s" "$p"
  cluster_pg_wait_standby "$p"
  echo "server $s is a standby of server $p again"
}

# Synchronous (on) or asynchronous (off) replication, from now on (reloads the running servers).
cmd_cluster_db_sync() {
  local mode i bin
  case ${1:-} in on) mode=sync ;; off) mode=async ;; *) die "usage: $ME cluster db-sync on|off" ;; esac
  mkdir -p "$CLUSTER_DIR"
  echo "$mode" >"$CLUSTER_DIR/pg-replication"
  for ((i = 1; i <= CLUSTER_PG_SIZE; i++)); do
    (
      cluster_pg "$i"
      pg_pid >/dev/null || exit 0
      printf '%s\n' "listen_addresses = '127.0.0.1'" "port = $PG_PORT" "unix_socket_directories = '${PG_SOCK//\'/\'\'}'" \
        "max_connections = 200" "$PG_CONF_EXTRA" | as_pg tee "$PG_DATA/baton.conf" >/dev/null
      bin=$(pg_bin_for_data)
      as_pg "$bin/pg_ctl" -D "$PG_DATA" -s reload
    )
  done
  echo "replication: $mode"
}
