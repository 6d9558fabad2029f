#!/usr/bin/env bash
# Runs once, when the primary of docker-compose.yml's `cluster` profile is initialised
# (/docker-entrypoint-initdb.d): the standby may stream from it, and a commit waits until the
# standby (application_name baton_pg_2) has flushed it. ALTER SYSTEM takes effect when the
# entrypoint starts the real server, after initialisation (the temporary server would otherwise
# wait for a standby that cannot exist yet).
set -euo pipefail
echo "host replication all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" <<'SQL'
ALTER SYSTEM SET synchronous_standby_names = 'baton_pg_2';
ALTER SYSTEM SET synchronous_commit = 'on';
SQL
