#!/bin/sh
# A streaming standby of postgres-primary: on an empty data directory, copy the primary
# with pg_basebackup (-R writes primary_conninfo and standby.signal; -C -S a replication
# slot, so the primary keeps the WAL the standby has not received yet), then start.
set -eu
PRIMARY_HOST="${PRIMARY_HOST:-postgres-primary}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready --host "$PRIMARY_HOST" --quiet; do sleep 1; done
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    PGPASSWORD="$POSTGRES_REPLICATION_PASSWORD" gosu postgres pg_basebackup \
        --host "$PRIMARY_HOST" --username replicator --pgdata "$PGDATA" \
        --wal-method stream --write-recovery-conf --create-slot --slot standby1 --progress
fi
exec docker-entrypoint.sh postgres
