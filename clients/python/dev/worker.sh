#!/usr/bin/env bash
# Development helper (not used by the tests): create the scratch virtual host and database when they
# are missing, migrate the database, declare the topology on the vhost and run one worker in the
# foreground.
#   clients/python/dev/worker.sh [N]      (default N=8; vhost $BATON_PYDEV_VHOST or baton-pydev,
#                                          database $BATON_PYDEV_DB or baton_pydev,
#                                          binary $BATON_BIN or .build/debug/baton)
# The vhost gets the permissions the users have on "/" (deploy/rabbitmq/definitions.json), through
# the management API at $BATON_BROKER_ADMIN_URL. Point the tests at it with
#   BATON_TEST_AMQP_URL=${BATON_FRONTEND_AMQP_URL%/*}/<vhost>
#   BATON_TEST_OPERATOR_AMQP_URL=${BATON_OPERATOR_AMQP_URL%/*}/<vhost>   BATON_TEST_PARTITIONS=N
set -euo pipefail
cd "$(dirname "$0")/../../.."
eval "$(scripts/services env)"
N=${1:-8}
VHOST=${BATON_PYDEV_VHOST:-baton-pydev}
DBNAME=${BATON_PYDEV_DB:-baton_pydev}
DB="${BATON_DATABASE_URL%%/baton\?*}/$DBNAME?sslmode=disable"
AMQP="${BATON_AMQP_URL%/*}/$VHOST"
B=${BATON_BIN:-.build/debug/baton}

[[ $VHOST =~ ^[A-Za-z0-9._-]+$ ]] || { echo "worker.sh: vhost name '$VHOST' needs percent-encoding; pick a plainer one" >&2; exit 2; }
[[ $DBNAME =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "worker.sh: database name '$DBNAME' is not a plain identifier" >&2; exit 2; }

# The virtual host and the users' permissions on it (idempotent PUTs). Credentials stay in the URLs,
# which are never echoed.
curl -sS -f -o /dev/null -X PUT "$BATON_BROKER_ADMIN_URL/api/vhosts/$VHOST"
python3 - "$VHOST" deploy/rabbitmq/definitions.json <<'EOF' | while read -r user body; do
import json, sys
vhost, path = sys.argv[1], sys.argv[2]
for p in json.load(open(path))["permissions"]:
    if p["vhost"] == "/":
        print(p["user"], json.dumps({k: p[k] for k in ("configure", "write", "read")}))
EOF
  curl -sS -f -o /dev/null -X PUT -H 'content-type: application/json' -d "$body" \
    "$BATON_BROKER_ADMIN_URL/api/permissions/$VHOST/$user"
done

# The database, owned by the service's database user.
if [[ -z $(psql "$BATON_DATABASE_URL" -Atc "SELECT 1 FROM pg_database WHERE datname = '$DBNAME'") ]]; then
  psql "$BATON_DATABASE_URL" -qc "CREATE DATABASE $DBNAME"
fi

"$B" migrate --database-url "$DB" --partition-count "$N"
"$B" topology --amqp-url "$AMQP" --database-url "$DB" --partition-count "$N"
exec "$B" worker --amqp-url "$AMQP" --database-url "$DB" --partition-count "$N" --metrics-port 0 --log-level warning
