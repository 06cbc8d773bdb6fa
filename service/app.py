"""One worker of `authsvc serve` (`serve --worker`, started by `service.supervisor`, which
migrates and watches it): start the server (`service.server`), say so to the supervisor
and beat, and stop gracefully on a signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from typing import Any, Final

from authsvc_client.addresses import HostPort

from service.components import key_encryption_key, start_database_clock
from service.database import open_database
from service.logs import json_line
from service.server import start_server
from service.settings import Settings

log = logging.getLogger(__name__)

READY_FD_VARIABLE = "AUTHSVC_WORKER_READY_FD"
# How long a stopping replica keeps serving after it reports NOT_SERVING: a client that
# watches health hears it within a round trip, so a second is ample on any network.
MAX_SHUTDOWN_DRAIN: Final = 1.0


def shutdown_drain(grace: float) -> float:
    """The part of AUTH_SHUTDOWN_GRACE spent serving on while NOT_SERVING (at most
    MAX_SHUTDOWN_DRAIN, at most half the grace); the rest is for calls in flight."""
    return min(MAX_SHUTDOWN_DRAIN, grace / 2)


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
"""Each asks `authsvc serve` (the supervisor, or a worker) for the graceful stop;
SIGQUIT too, so it leaves no embedded PostgreSQL or metrics files behind."""


async def serve(settings: Settings) -> None:
    """One worker: start, and run until SIGTERM, SIGINT or SIGQUIT (SIGHUP is ignored by
    the command, see `service.cli`). It binds with SO_REUSEPORT beside its siblings (and,
    while one is replaced, beside its replacement) and tells the supervisor through a pipe
    when it is ready, then beats on it."""
    # From here on a signal asks for a graceful stop (even one that arrives while starting).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    key_encryption_key(settings)  # a missing AUTH_KEK stops us before the database is touched
    # A worker only checks the schema: the supervisor migrated.
    async with open_database(settings, migrate=False) as database:
        # Before serving: refused here (one line) if this host's clock is too far off.
        clock = await start_database_clock(settings, database.pool)
        running = await start_server(
            settings,
            dsn=database.dsn,
            pool=database.pool,
            clock=clock,
            reuse_port=True,
            agree_settings=False,
        )
        heartbeat = _tell_supervisor_ready()
        await stop.wait()
        drain = shutdown_drain(settings.shutdown_grace)
        log.info(
            "stopping: NOT_SERVING, serving %.1fs more while clients move away, then "
            "in-flight calls get %.1fs",
            drain,
            settings.shutdown_grace - drain,
        )
        # The pool closes after the server, so in-flight calls could finish.
        await running.stop(settings.shutdown_grace - drain, drain=drain)
        if heartbeat is not None:
            heartbeat.cancel()


HEARTBEAT_INTERVAL: Final = 1.0
"""Seconds between a worker's heartbeats to its supervisor (`service.supervisor`)."""


def _tell_supervisor_ready() -> asyncio.Task[None] | None:
    """Tell the supervisor through its pipe that we serve, then beat on the same pipe from
    this event loop for as long as we run: a worker whose loop stops turning (stopped,
    deadlocked, pinned) is seen by its silence and replaced."""
    fd = os.environ.get(READY_FD_VARIABLE)
    if fd is None:
        return None
    os.write(int(fd), b"r")
    os.set_blocking(int(fd), False)  # a full pipe must never hold up this loop
    return asyncio.get_running_loop().create_task(_beat(int(fd)))


async def _beat(fd: int) -> None:
    try:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                os.write(fd, b"h")
            except BlockingIOError:
                pass  # the supervisor reads late; its pipe is full of earlier beats
            except OSError:
                return  # the supervisor is gone (we die with it)
    finally:
        os.close(fd)


def print_banner(
    settings: Settings,
    address: str,
    *,
    workers: int,
    has_users: bool,
    metrics: str | None = None,
) -> None:
    """What `make run` shows: the first-user command (only while the database has no
    user), the metrics address, then the address.
    Tooling finds the ports with patterns on "metrics on http://..." and "authsvc serving on
    HOST:PORT": the text lines stay as they are, and with AUTH_LOG_FORMAT=json each line is
    an object like the log lines' whose message is that text, with the values as fields."""
    where = "AUTH_DATABASE_URL"
    if settings.database_url is None:
        where = "embedded PostgreSQL in " + str(settings.data_dir / "postgres")
    as_json = settings.log_format == "json"
    # Followed as printed, the command must reach this server's database.
    first_user = "create a first user (in another terminal, same directory):"
    command = ".venv/bin/authsvc users create alice --scope read --password-stdin"
    if settings.database_url is not None:
        first_user = "create a first user (in another terminal, with the same AUTH_* environment):"
    elif settings.data_dir != Settings().data_dir:  # not AUTH_DATA_DIR's default
        command = f"AUTH_DATA_DIR={shlex.quote(str(settings.data_dir))} {command}"
    lines: list[tuple[str, dict[str, Any]]] = []
    if not has_users:
        lines.append((f"{first_user} {command}" if as_json else f"{first_user}\n  {command}", {}))
    if metrics is not None:
        url = f"http://{metrics}/metrics"
        lines.append((f"metrics on {url}", {"metrics": url}))
    lines.append(
        (
            f"authsvc serving on {address} ({workers} worker{'s' if workers != 1 else ''}, "
            f"database: {where})",
            {
                "address": address,
                "port": HostPort.parse(address).port,
                "workers": workers,
                "database": where,
            },
        )
    )
    for text, fields in lines:
        print(json_line(text, **fields) if as_json else text, flush=True)
