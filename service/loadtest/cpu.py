"""CPU time spent by the server and by PostgreSQL over a bench run (`authsvc bench`'s
cost per operation): process CPU times read with psutil before and after the run.

The server: the `authsvc serve` process and its workers (not the PostgreSQL it may have
started). PostgreSQL: its postmaster, every live child, and the children that exited
meanwhile (the postmaster waits for them, so their time is in its children's times).
A PostgreSQL on another host cannot be read: None.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
import psutil


def _own_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _is_postgres(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.name().startswith(("postgres", "postmaster"))
    return False


@dataclass(frozen=True)
class CpuSeconds:
    server: float
    postgres: float | None


class CpuMeter:
    """Reads the CPU seconds used so far by one server and one PostgreSQL."""

    def __init__(self, server_pid: int, postmaster: psutil.Process | None) -> None:
        self._server = psutil.Process(server_pid)
        self._postmaster = postmaster

    @classmethod
    def attach(cls, server_pid: int, database_url: str) -> CpuMeter:
        return cls(server_pid, asyncio.run(_find_postmaster(database_url)))

    def read(self) -> CpuSeconds:
        server = 0.0
        with contextlib.suppress(psutil.Error):
            for process in [self._server, *self._server.children(recursive=True)]:
                if not _is_postgres(process):
                    with contextlib.suppress(psutil.Error):
                        server += _own_seconds(process)
        return CpuSeconds(server=server, postgres=self._postgres())

    def _postgres(self) -> float | None:
        if self._postmaster is None:
            return None
        try:
            times = self._postmaster.cpu_times()
            total = float(times.user + times.system + times.children_user + times.children_system)
            children = self._postmaster.children()
        except psutil.Error:
            return None
        for child in children:
            with contextlib.suppress(psutil.Error):
                total += _own_seconds(child)
        return total


async def _find_postmaster(database_url: str) -> psutil.Process | None:
    """The postmaster of the database's server, if it runs on this host and we may read it."""
    conn = await asyncpg.connect(database_url)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        try:
            parent = psutil.Process(backend).parent()
        except psutil.Error:
            return None  # another host (or another user's processes)
    finally:
        await conn.close()
    return parent if parent is not None and _is_postgres(parent) else None
