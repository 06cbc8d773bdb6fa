"""What every part of the PostgreSQL store shares: the pool, the connection and
transaction helpers, the bootstrap lock, and the one mapping of database errors.

The store takes a pool; it never creates one behind your back. Errors are mapped by
asyncpg exception class (SQLSTATE), never by message text: lost or refused connections,
timeouts and writes refused by a read-only server (a standby) become `DatabaseUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from service.errors import DatabaseUnavailable

# Connection trouble, by class: SQLSTATE 08 (connection), 57 (operator
# intervention: shutdown, cancel, cannot connect now), 53 (out of resources),
# client-side interface and protocol-state errors (closed connection or pool),
# OS-level socket errors and timeouts.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    # asyncpg's protocol can end in an inconsistent state when the server shuts down
    # mid-call ("cannot switch to state ..."); the connection is gone either way.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # lock_timeout (SQLSTATE 55P03): another replica held a lock for too long.
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

# Serializes key and secret creation (and the shared settings' record) between replicas
# starting together.
BOOTSTRAP_LOCK_ID = 0x61757468  # "auth"


async def try_session_lock(conn: asyncpg.Connection, lock_id: int) -> bool:
    """Try to take a session-level advisory lock on a pooled connection. If the call is cut
    short (cancelled, timed out), the database may have granted the lock with its answer
    unread: the connection is dropped then, so that the lock never stays with a connection
    someone else gets from the pool (which does not reset connections)."""
    try:
        taken: bool = await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id)
    except BaseException:
        conn.terminate()
        raise
    return taken


async def release_session_lock(conn: asyncpg.Connection, lock_id: int) -> None:
    """Let go of a session-level advisory lock taken on a pooled connection. The pool does
    not reset connections (`service.database.create_pool`): if this cannot be done (the
    call cut short, the connection broken), the connection is dropped, so that the lock
    never stays with a connection someone else gets from the pool."""
    if conn.is_closed():
        return
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
    except BaseException:
        conn.terminate()
        raise


class StoreBase:
    """A pool, a statement timeout and the window of aggregated security events."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float, event_window: float = 300) -> None:
        self._pool = pool
        self._timeout = timeout
        # Repeats of an aggregated event within one such window share a row.
        self._event_window = event_window

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    yield conn
                except asyncpg.ReadOnlySQLTransactionError as exc:
                    # A standby (or a server made read-only): no write will succeed on
                    # this session. Dropped, so that the pool connects again, which with
                    # target_session_attrs=read-write finds the primary.
                    conn.terminate()
                    raise DatabaseUnavailable() from exc
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def bootstrap_lock(self) -> AsyncIterator[None]:
        """Held while a replica creates or rotates keys or the first secret, so only one
        does at a time (it holds one pooled connection; the work inside uses others)."""
        async with self._transaction() as conn:
            await self._take_bootstrap_lock(conn)
            yield

    async def _take_bootstrap_lock(self, conn: asyncpg.Connection) -> None:
        """The bootstrap lock, until `conn`'s transaction ends."""
        # Never wait forever behind another replica: give up as UNAVAILABLE instead, a
        # little before the statement timeout, so the server's clean error comes first.
        lock_timeout_ms = max(1, int(self._timeout * 900))
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{lock_timeout_ms}ms")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK_ID)
