#!/bin/sh
# First start of the primary (the postgres image runs /docker-entrypoint-initdb.d/* once,
# on an empty data directory): a role the standby streams WAL with, allowed from any address
# of the compose network. The authsvc role and database are POSTGRES_USER / POSTGRES_DB.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=password="$POSTGRES_REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
