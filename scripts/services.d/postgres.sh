# shellcheck shell=bash
# scripts/services.d/postgres.sh — the native PostgreSQL server: layout, init, start, provision, stop.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# PostgreSQL (native)

as_pg() { # run a command as the user owning the cluster (postgres when we are root)
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

PG_BASE='' PG_DATA='' PG_SOCK='' PG_LOG=''
pg_layout() {
  [[ -z $PG_BASE ]] || return 0
  local loc="$BATON_DIR/postgres.location" candidate="$BATON_DIR/postgres"
  if [[ -s $loc ]]; then
    PG_BASE=$(<"$loc")
  else
    PG_BASE=$candidate
    local why=
    # a unix socket path must stay under ~107 bytes
    if ((${#candidate} + 20 > 100)); then why="the path $candidate is too long for a unix socket"; fi
    if [[ -z $why ]] && is_root && [[ -d $BATON_DIR ]] && getent passwd postgres >/dev/null &&
      ! runuser -u postgres -- test -x "$BATON_DIR" 2>/dev/null; then
      why="user postgres cannot traverse $REPO (a parent folder lacks the x bit for others)"
    fi
    if [[ -n $why ]]; then
      local hash; hash=$(printf '%s' "$REPO" | sha256sum | cut -c1-12)
      PG_BASE="/tmp/baton-$hash/postgres"
      PG_FALLBACK_WHY=$why
    fi
  fi
  PG_DATA="$PG_BASE/data"
  PG_SOCK="$PG_BASE/run"
  if [[ $PG_BASE == "$BATON_DIR"/* ]]; then PG_LOG="$LOG_DIR/postgres.log"; else PG_LOG="$PG_BASE/postgres.log"; fi
}
PG_FALLBACK_WHY=
PG_CLUSTER=''    # the cluster server (1 or 2) the PG_* globals point at, or empty for the single one
PG_CONF_EXTRA='' # more lines for baton.conf

pg_pid() { # pid of our postmaster, if it runs
  pg_layout
  local pid
  pid=$(head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null) || return 1
  pid_alive "$pid" postgres && echo "$pid"
}

pg_bin_for_data() {
  local major=
  if [[ -f $PG_DATA/PG_VERSION ]]; then
    major=$(<"$PG_DATA/PG_VERSION")
    pg_bin_dir "$major" || die "$PG_DATA was created by PostgreSQL $major, whose binaries are not installed (remove $PG_DATA to start over)"
  else
    pg_bin_dir || die "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
  fi
}

pg_init() { # $1: bin dir
  local bin=$1
  [[ -f $PG_DATA/PG_VERSION ]] && return 0
  if [[ -n $PG_FALLBACK_WHY ]]; then
    info "postgres data goes to $PG_BASE: $PG_FALLBACK_WHY"
  fi
  mkdir -p "$PG_BASE" "$(dirname "$PG_LOG")"
  if is_root; then
    getent passwd postgres >/dev/null || die "no 'postgres' user (is the postgresql package installed?)"
    chown postgres:postgres "$PG_BASE"
  fi
  chmod 755 "$PG_BASE"
  as_pg mkdir -p "$PG_DATA" "$PG_SOCK"
  as_pg chmod 700 "$PG_DATA"
  info "initdb $PG_DATA"
  local out
  if ! out=$(as_pg "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 2>&1); then
    printf '%s\n' "$out" >&2
    rm -rf "$PG_DATA"
    die "initdb failed"
  fi
  pg_include_baton_conf
  if [[ -z $PG_CLUSTER ]]; then printf '%s\n' "$PG_BASE" >"$BATON_DIR/postgres.location"; fi
}
pg_include_baton_conf() {
  printf "\n# Baton: settings that depend on this checkout's location, rewritten by %s\ninclude_if_exists = 'baton.conf'\n" "$ME" \
    | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_start() {
  # Decide the data location now that the packages (and so user postgres) are installed.
  if [[ ! -s $BATON_DIR/postgres.location ]]; then PG_BASE=''; PG_FALLBACK_WHY=''; fi
  pg_layout
  local bin; bin=$(pg_bin_for_data)
  pg_init "$bin"
  pg_launch "$bin"
}

pg_launch() { # $1: bin dir. Writes baton.conf (with $PG_CONF_EXTRA) and starts the server in $PG_DATA.
  local bin=$1
  if is_root && [[ $(stat -c %U "$PG_DATA") != postgres ]]; then
    # e.g. the postgresql package was reinstalled and user postgres got another uid
    info "giving $PG_BASE back to user postgres"
    chown -R postgres:postgres "$PG_BASE"
    if [[ -e $PG_LOG ]]; then chown postgres:postgres "$PG_LOG"; fi
  fi
  as_pg mkdir -p "$PG_SOCK"
  # PostgreSQL's durable defaults (fsync, synchronous_commit), like the docker image: the benchmark
  # compares commit costs, which a no-fsync instance would hide.
  as_pg tee "$PG_DATA/baton.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '${PG_SOCK//\'/\'\'}'
max_connections = 200
$PG_CONF_EXTRA
EOF
  if [[ ! -e $PG_LOG ]]; then
    mkdir -p "$(dirname "$PG_LOG")"; : >"$PG_LOG"
    if is_root; then chown postgres:postgres "$PG_LOG"; fi
  fi
  if ! as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -s start 9>&-; then
    tail -n 20 "$PG_LOG" >&2 || true
    die "PostgreSQL did not start (log: $PG_LOG)"
  fi
  PG_VERSION_STARTED=$(<"$PG_DATA/PG_VERSION")
}
PG_VERSION_STARTED=

pg_provision() { # role and database baton (idempotent); superuser like POSTGRES_USER in docker
  local bin; bin=$(pg_bin_for_data)
  "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton') THEN CREATE ROLE baton; END IF;
END $$;
ALTER ROLE baton WITH LOGIN SUPERUSER PASSWORD 'baton';
SELECT 'CREATE DATABASE baton OWNER baton' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'baton') \gexec
SQL
}

pg_stop() {
  pg_layout
  local bin; bin=$(pg_bin_for_data)
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop
}
