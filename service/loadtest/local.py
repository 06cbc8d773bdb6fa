"""A server started for a load run, and the users a load run logs in as."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from service.components import open_components
from service.database import attach_embedded_uri
from service.loadtest.server_process import ServeCommand, serving
from service.settings import Settings


@dataclass(frozen=True)
class LocalServer:
    target: str
    """HOST:PORT"""
    settings: Settings
    """Settings that reach the server's database."""
    pid: int
    """The `authsvc serve` process (the supervisor, with several workers)."""


@contextmanager
def local_server(
    *, workers: int, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, Settings]]:
    """`authsvc serve` on 127.0.0.1 with a fresh embedded PostgreSQL (or AUTH_DATABASE_URL).

    Yields the target address and the settings that reach the same database.
    The server is stopped with SIGTERM when the block ends.
    """
    with local_server_process(workers=workers, extra_env=extra_env) as server:
        yield server.target, server.settings


@contextmanager
def local_server_process(
    *, workers: int, extra_env: dict[str, str] | None = None
) -> Iterator[LocalServer]:
    """`local_server`, with the server's process id (the bench reads its CPU time)."""
    with tempfile.TemporaryDirectory(prefix="authsvc-load-") as data_dir:
        env = dict(os.environ)
        env.update(extra_env or {})
        if env.get("AUTH_DATABASE_URL") and not env.get("AUTH_KEK"):
            # A database URL needs AUTH_KEK: a fresh one, as the throwaway data directory's
            # KEK file was before (a database with keys under another KEK is refused).
            env["AUTH_KEK"] = base64.b64encode(secrets.token_bytes(32)).decode()
        if not env.get("AUTH_DATABASE_URL"):
            # A fresh database of its own: the load logs the same few users in again and
            # again, and at the default session cap (100) their older sessions would be
            # evicted and most Validates answer REVOKED. (On a given database the shared
            # settings recorded there apply.)
            env.setdefault("AUTH_MAX_SESSIONS_PER_USER", "10000")
        env["AUTH_DATA_DIR"] = data_dir
        env["AUTH_LISTEN"] = "127.0.0.1:0"
        # Its stderr is ours (the load run's), as is its lifetime: SIGTERM at the end, or
        # when we die (a killed bench left its servers running).
        command = ServeCommand(env, workers=workers, stderr=None, within=120, die_with_parent=True)
        with serving(command) as server:
            settings = Settings.from_env(env)
            if settings.database_url is None:
                # Reach the server's embedded PostgreSQL without sharing its lifetime.
                settings = replace(settings, database_url=attach_embedded_uri(Path(data_dir)))
            yield LocalServer(server.target, settings, server.pid)


def seed_users(settings: Settings, count: int) -> tuple[tuple[str, ...], str]:
    """Create `count` users for the run (through the same domain code as `authsvc users`)."""
    password = secrets.token_urlsafe(18)
    prefix = f"load-{secrets.token_hex(4)}"

    async def create() -> tuple[str, ...]:
        async with open_components(settings) as components:
            names = tuple(f"{prefix}-{i}" for i in range(count))
            await asyncio.gather(*(components.users.create(n, password, ()) for n in names))
            return names

    return asyncio.run(create()), password
