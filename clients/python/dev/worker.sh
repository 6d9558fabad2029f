#!/usr/bin/env bash
# Development helper (not used by the tests): migrate the scratch database, declare the topology
# on the scratch vhost and run one worker in the foreground.
#   clients/python/dev/worker.sh [N]      (default N=8; vhost $BATON_PYDEV_VHOST or baton-pydev,
#                                          database $BATON_PYDEV_DB or baton_pydev)
set -euo pipefail
cd "$(dirname "$0")/../../.."
eval "$(scripts/services env)"
N=${1:-8}
VHOST=${BATON_PYDEV_VHOST:-baton-pydev}
DB="${BATON_DATABASE_URL%%/baton\?*}/${BATON_PYDEV_DB:-baton_pydev}?sslmode=disable"
AMQP="${BATON_AMQP_URL%/*}/$VHOST"
B=.build/debug/baton
$B migrate --database-url "$DB" --partition-count "$N"
$B topology --amqp-url "$AMQP" --database-url "$DB" --partition-count "$N"
exec $B worker --amqp-url "$AMQP" --database-url "$DB" --partition-count "$N" --metrics-port 0 --log-level warning
