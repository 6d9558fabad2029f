#!/usr/bin/env bash
# Entrypoint of the standby of docker-compose.yml's `cluster` profile: on first start, a base backup
# of the primary (pg-primary) with standby.signal and a primary_conninfo naming it baton_pg_2 (the
# primary's synchronous standby); then the image's own entrypoint runs the server.
set -euo pipefail
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  until pg_isready -q -h pg-primary -U "$POSTGRES_USER" -d "$POSTGRES_DB"; do sleep 1; done
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  export PGPASSWORD=$POSTGRES_PASSWORD
  gosu postgres pg_basebackup -d "host=pg-primary user=$POSTGRES_USER application_name=baton_pg_2_copy" \
    -D "$PGDATA" -X stream -c fast
  gosu postgres touch "$PGDATA/standby.signal"
  echo "primary_conninfo = 'host=pg-primary user=$POSTGRES_USER password=$POSTGRES_PASSWORD application_name=baton_pg_2'" |
    gosu postgres tee -a "$PGDATA/postgresql.auto.conf" >/dev/null
  unset PGPASSWORD
fi
exec docker-entrypoint.sh "$@"
