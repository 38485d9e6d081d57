#!/usr/bin/env bash
# First start of the bundled PostgreSQL (the image runs /docker-entrypoint-initdb.d/ once, on an
# empty data volume): Dagster's own database and role, then the project's databases and
# least-privilege roles (docker/postgres-roles.sql). The passwords come from docker/.env.
#
# Against a PostgreSQL of your own, run it as its superuser with the roles script beside it:
#   PGHOST=db.example.com POSTGRES_USER=postgres ROLES_SQL=docker/postgres-roles.sql \
#     DAGSTER_PG_PASSWORD=... RILLET_CODE_PG_PASSWORD=... RILLET_RECEIVER_PG_PASSWORD=... \
#     RILLET_ANALYST_PG_PASSWORD=... bash docker/postgres-init.sh
# Arguments are passed to the roles script's psql (-v warehouse_db=... and the other names it
# documents); DAGSTER_PG_ROLE and DAGSTER_PG_DB rename Dagster's role and database. Rerunning it
# is safe and sets the passwords again.
set -euo pipefail

: "${DAGSTER_PG_PASSWORD:?set DAGSTER_PG_PASSWORD}"
ROLES_SQL="${ROLES_SQL:-/docker-entrypoint-initdb.d/rillet-roles.sql.in}"
PSQL=(psql -X -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres)

"${PSQL[@]}" -v role="${DAGSTER_PG_ROLE:-dagster}" -v db="${DAGSTER_PG_DB:-dagster}" \
    -v password="$DAGSTER_PG_PASSWORD" <<'SQL'
SET client_min_messages = warning;
SELECT format('CREATE ROLE %I LOGIN', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SQL

"${PSQL[@]}" "$@" -f "$ROLES_SQL"
