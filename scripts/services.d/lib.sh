# shellcheck shell=bash
# scripts/services.d/lib.sh — helpers every part shares: messages, URL parsing, waiting, markers, the lock.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# helpers

info() { printf '%s: %s\n' "$ME" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$ME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }
is_root() { [[ $(id -u) == 0 ]]; }

# URL with its password (userinfo or ?password=) replaced by ********.
redact() {
  sed -E -e 's#^([A-Za-z][A-Za-z0-9+.-]*://[^:/?@]*):.*@#\1:********@#' \
    -e 's#([?&]password=)[^&]*#\1********#' <<<"$1"
}

# Single-quote a string for the shell.
json_string() { # text -> a JSON string literal (quotes, backslashes and control characters escaped)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

# "host port" of a URL (default port $2).
url_host_port() {
  local rest=${1#*://} host port=
  rest=${rest%%[/?#]*}
  rest=${rest##*@}
  if [[ $rest == \[* ]]; then
    host=${rest%%]*}; host=${host#[}
    port=${rest#*]}; port=${port#:}
  else
    host=${rest%%:*}
    if [[ $rest == *:* ]]; then port=${rest#*:}; fi
  fi
  printf '%s %s\n' "${host:-localhost}" "${port:-$2}"
}

# shellcheck disable=SC2016 # $0/$1 expand in the child bash
tcp_open() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }

pg_answers() { # url
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -t 2 -d "$1" >/dev/null 2>&1
  else
    local hp; hp=$(url_host_port "$1" 5432); tcp_open "${hp% *}" "${hp#* }"
  fi
}
amqp_answers() { # url
  local hp def=5672
  if [[ $1 == amqps://* ]]; then def=5671; fi
  hp=$(url_host_port "$1" "$def"); tcp_open "${hp% *}" "${hp#* }"
}
pg_local_answers() { tcp_open 127.0.0.1 "$PG_PORT" && pg_answers "$DEFAULT_DATABASE_URL"; }
amqp_local_answers() { tcp_open 127.0.0.1 "$AMQP_PORT"; }
# The local broker's management HTTP API answers an authenticated request of baton-admin.
mgmt_local_answers() {
  curl -fsS -o /dev/null --max-time 3 "$DEFAULT_BROKER_ADMIN_URL/api/overview" 2>/dev/null
}

wait_for() { # seconds cmd...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

pid_alive() { # pid expected-comm (a zombie, killed but not yet reaped, is not alive)
  [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2"* ]] &&
    [[ $(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null) != Z ]]
}

marker() { cat "$MARK_DIR/$1" 2>/dev/null || true; }
set_marker() { mkdir -p "$MARK_DIR"; printf '%s\n' "$2" >"$MARK_DIR/$1"; }
clear_marker() { rm -f "$MARK_DIR/$1"; }

take_lock() {
  mkdir -p "$BATON_DIR"
  exec 9>>"$BATON_DIR/lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 300 9 || die "another '$ME' is still running (lock $BATON_DIR/lock)"
  fi
}
