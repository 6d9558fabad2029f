# shellcheck shell=bash
# scripts/services.d/install.sh — Debian packages (apt-get, as root), the Python test environment, promtool.
# Sourced by scripts/services, which sets the globals (ports, URLs, directories) first.

# ---------------------------------------------------------------------------------------------
# packages

APT_UPDATED=0
POLICY_GUARD=0
drop_policy_guard() { if ((POLICY_GUARD)); then rm -f /usr/sbin/policy-rc.d; POLICY_GUARD=0; fi; }
trap drop_policy_guard EXIT

apt_install() {
  # Debian's postinst scripts would start the system-wide postgresql/rabbitmq services; we do
  # not use them, so deny service starts during the install (unless a policy already exists).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# temporary, from Baton %s\nexit 101\n' "$ME" >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_GUARD=1
  fi
  local rc=0
  if ((!APT_UPDATED)); then
    info "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || rc=$?
    APT_UPDATED=1
  fi
  if ((rc == 0)); then
    info "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      --no-install-recommends "$@" >&2 || rc=$?
  fi
  drop_policy_guard
  return $rc
}

pkg_installed() { dpkg -s "$1" >/dev/null 2>&1; }

ensure_curl() { # `up` asks RabbitMQ's management API whether it answers
  command -v curl >/dev/null 2>&1 && return 0
  if is_root && command -v apt-get >/dev/null 2>&1; then
    apt_install curl || die "apt-get install curl failed"
  else
    die "curl is missing (needed to check RabbitMQ's management API); e.g. sudo apt-get install -y curl"
  fi
}

pg_bin_dir() { # [major]: highest installed server version (or that major)
  local d v best='' bestv=-1
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres && -x $d/psql ]] || continue
    v=${d#/usr/lib/postgresql/}; v=${v%%/*}
    [[ $v =~ ^[0-9]+$ ]] || continue
    if [[ -n ${1:-} ]]; then [[ $v == "$1" ]] && { echo "$d"; return 0; }; continue; fi
    if ((v > bestv)); then best=$d; bestv=$v; fi
  done
  [[ -n $best ]] && echo "$best"
}

# $1: "pg" and/or "rmq" servers needed natively. Dev libraries (the Swift build links libpq and
# librabbitmq) are always checked.
ensure_packages() {
  local servers=() dev=()
  if [[ " $* " == *" pg "* ]] && ! pg_bin_dir >/dev/null; then servers+=(postgresql); fi
  if [[ " $* " == *" rmq "* ]] && [[ ! -x $RMQ_LIB/rabbitmq-server || ! -x $RMQ_LIB/rabbitmqctl ]]; then
    servers+=(rabbitmq-server)
  fi
  if command -v dpkg >/dev/null 2>&1; then
    pkg_installed libpq-dev || dev+=(libpq-dev)
    pkg_installed librabbitmq-dev || dev+=(librabbitmq-dev)
  fi
  ((${#servers[@]} + ${#dev[@]})) || return 0
  if is_root && command -v apt-get >/dev/null 2>&1; then
    apt_install "${servers[@]}" "${dev[@]}" || die "apt-get install ${servers[*]} ${dev[*]} failed"
    if ((${#servers[@]})); then
      if [[ " ${servers[*]} " == *" postgresql "* ]] && ! pg_bin_dir >/dev/null; then
        die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
      fi
    fi
    return 0
  fi
  if ((${#servers[@]})); then
    die "missing ${servers[*]}; install them first, e.g.:
    sudo apt-get install -y ${servers[*]} ${dev[*]}
  (or start a Docker engine, or export BATON_DATABASE_URL / BATON_AMQP_URL to use servers elsewhere)"
  fi
  warn "missing ${dev[*]} (the Swift build needs them): sudo apt-get install -y ${dev[*]}"
}



cmd_python_env() { # idempotent: quick when the environment already has what the tests import
  local venv=$REPO/.build-python/venv requirements=$REPO/clients/python/requirements-test.txt
  if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import pika, pytest, jsonschema, wheel' 2>/dev/null; then
    info "python: $venv ready"
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || { is_root && apt_install python3; } || die "python3 is missing (apt-get install python3)"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    is_root && command -v apt-get >/dev/null 2>&1 || die "python3 cannot make virtual environments: apt-get install python3-venv"
    apt_install python3-venv || die "apt-get install python3-venv failed"
  fi
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2 || die "pip install -r $requirements failed (PyPI unreachable?)"
  info "python: $venv ready ($("$venv/bin/python" --version 2>&1))"
}

# Prometheus's promtool (Debian's prometheus package; its server is not started), for scripts/test's
# check of deploy/prometheus; prints its path.
cmd_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    is_root && command -v apt-get >/dev/null 2>&1 || die "promtool is missing: apt-get install prometheus (as root)"
    apt_install prometheus || die "apt-get install prometheus failed"
  fi
  command -v promtool
}
