# shellcheck shell=bash
# scripts/services.d/faults.sh — fault injection on the single node (tests and `baton chaos`).
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# Pause and resume the broker (for fault-injection tests): the node keeps its data and queues.
cmd_broker() { # stop|start
  local action=$1
  if ((RMQ_EXTERNAL)); then die "BATON_AMQP_URL points at an external broker; $ME does not control it"; fi
  if rmq_pid >/dev/null; then
    case $action in
      stop) rmq_drop_stats_handler; rmq_ctl stop_app >/dev/null ;;
      start)
        # A failed start_app must not read as started (set -e does not stop at the left of &&).
        rmq_ctl start_app >/dev/null || die "rabbitmqctl start_app failed: see $LOG_DIR/rabbitmq"
        rmq_ctl await_startup >/dev/null || die "RabbitMQ did not finish starting: see $LOG_DIR/rabbitmq"
        ;;
    esac
  elif [[ $(marker rabbitmq) == docker ]] && docker_usable; then
    case $action in
      stop) compose stop rabbitmq 9>&- >&2 ;;
      start) compose up -d --wait rabbitmq 9>&- >&2 ;;
    esac
  else
    die "RabbitMQ was not started by $ME; cannot $action it"
  fi
  if [[ $action == stop ]]; then echo "rabbitmq: broker stopped"; else echo "rabbitmq: broker started"; fi
}

# Raise or clear the broker's memory alarm (fault-injection tests). With a high watermark of 1e-7
# of the machine's memory the node is always above it: it raises the alarm and blocks publishing
# connections (connection.blocked). 0.4 is RabbitMQ's default; a node restart also restores it.
cmd_broker_alarm() { # on|off
  local state=$1 watermark out
  case $state in
    on) watermark=0.0000001 ;;
    off) watermark=0.4 ;;
    *) die "usage: $ME broker-alarm on|off" ;;
  esac
  if ((RMQ_EXTERNAL)); then die "BATON_AMQP_URL points at an external broker; $ME does not control it"; fi
  if rmq_pid >/dev/null; then
    RMQ_MODE=native
  elif [[ $(marker rabbitmq) == docker ]] && docker_usable; then
    RMQ_MODE=docker
  else
    die "RabbitMQ was not started by $ME; cannot set its memory alarm"
  fi
  out=$(broker_ctl set_vm_memory_high_watermark "$watermark" 2>&1) ||
    die "rabbitmqctl set_vm_memory_high_watermark $watermark failed: $out"
  if [[ $state == on ]]; then
    echo "rabbitmq: memory alarm on (high watermark $watermark): publishers are blocked"
  else
    echo "rabbitmq: memory alarm off (high watermark $watermark)"
  fi
}

# Suspend (on) or resume (off) the Raft server of one quorum queue of the single node (fault-injection
# tests): the queue takes publishes into its mailbox and confirms none, as a leader whose node froze
# does, while the node and every other queue go on.
cmd_queue_freeze() { # vhost queue on|off
  local vhost=$1 queue=$2 state=$3 call out
  case $state in
    on) call=suspend ;;
    off) call=resume ;;
    *) die "usage: $ME queue-freeze VHOST QUEUE on|off" ;;
  esac
  [[ -n $vhost && -n $queue && $vhost$queue != *[\\\"]* ]] || die "usage: $ME queue-freeze VHOST QUEUE on|off (names without quotes or backslashes)"
  if ((RMQ_EXTERNAL)); then die "BATON_AMQP_URL points at an external broker; $ME does not control it"; fi
  if rmq_pid >/dev/null; then
    RMQ_MODE=native
  elif [[ $(marker rabbitmq) == docker ]] && docker_usable; then
    RMQ_MODE=docker
  else
    die "RabbitMQ was not started by $ME; cannot freeze its queues"
  fi
  out=$(broker_ctl eval "{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"$vhost\">>, queue, <<\"$queue\">>)), {Name, _} = amqqueue:get_pid(Q), sys:$call(Name)." 2>&1) ||
    die "freezing queue '$queue' in '$vhost' failed: $out"
  echo "rabbitmq: queue '$queue' in '$vhost' ${state/on/frozen}"
}

# Restart PostgreSQL (fault-injection tests): fast shutdown, clients lose their connections.
cmd_db_restart() {
  if ((PG_EXTERNAL)); then die "BATON_DATABASE_URL points at an external server; $ME does not control it"; fi
  if pg_pid >/dev/null; then
    local bin; bin=$(pg_bin_for_data)
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t 60 -s restart 9>&- >/dev/null
  elif [[ $(marker postgres) == docker ]] && docker_usable; then
    compose restart postgres 9>&- >&2
  else
    die "PostgreSQL was not started by $ME; cannot restart it"
  fi
  echo "postgres: restarted"
}


cmd_broker_freeze() { # on|off
  local pid
  if ((RMQ_EXTERNAL)); then die "BATON_AMQP_URL points at an external broker; $ME does not control it"; fi
  pid=$(rmq_pid) || die "RabbitMQ was not started natively by $ME; cannot freeze it"
  case ${1:-} in
    on) kill -STOP "$pid"; echo "rabbitmq: frozen (SIGSTOP of pid $pid)" ;;
    off) kill -CONT "$pid"; echo "rabbitmq: resumed (SIGCONT of pid $pid)" ;;
    *) die "usage: $ME broker-freeze on|off" ;;
  esac
}
