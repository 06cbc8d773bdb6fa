"""The embedded PostgreSQL's own log keeps its own events (start, stop, checkpoints), not
the errors of the service's statements: the service reports those itself, and a client
can make statements fail at will (its deadline cancels its call's statement), each of
which PostgreSQL logged with the statement's whole text (~60 lines for a refresh batch;
an outside review made a client grow the log by ~0.46 MB/s)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from service.database import embedded_server_uri
from tests.throwaway_pg import pgdata_of, stop_embedded_postgres


async def test_failed_and_cancelled_statements_leave_no_lines_in_its_log(
    throwaway_pg_dir: Path,
) -> None:
    uri = await asyncio.to_thread(embedded_server_uri, throwaway_pg_dir)
    try:
        conn = await asyncpg.connect(uri)
        try:
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval('SELECT 1 / 0 AS "failed-statement-marker"')
            with pytest.raises(TimeoutError):  # asyncpg cancels it on the server
                await conn.execute(
                    "SELECT pg_sleep(5) /* cancelled-statement-marker */", timeout=0.2
                )
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        await asyncio.sleep(0.2)  # the log is written by the server's processes
        log = (pgdata_of(throwaway_pg_dir) / "log").read_text()
    finally:
        await asyncio.to_thread(stop_embedded_postgres, throwaway_pg_dir)
    assert "database system is ready to accept connections" in log  # it does log
    assert "failed-statement-marker" not in log
    assert "cancelled-statement-marker" not in log
    assert "canceling statement" not in log
    assert "division by zero" not in log
