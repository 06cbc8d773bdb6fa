"""What every part of the PostgreSQL store shares: the pool, the connection and
transaction helpers, the bootstrap lock, and the one mapping of database errors.

The store takes a pool; it never creates one behind your back. Errors are mapped by
asyncpg exception class (SQLSTATE), never by message text: lost or refused connections,
timeouts and writes refused by a read-only server (a standby) become `DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

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


async def keep_session_state(conn: asyncpg.Connection) -> None:
    """The pool's `reset`: nothing to reset when a connection goes back to the pool
    (asyncpg rolls back an open transaction itself): the service leaves no session state
    on pooled connections (settings and advisory locks it takes are the transaction's, or,
    the janitor's, let go before release or the connection dropped), so asyncpg's default
    reset (`RESET ALL`, `UNLISTEN *`, ... : one more round trip per use) would only cost
    time."""


# The asyncpg releases whose pool internals `_release_at_once` and `_has_free_holder` were
# checked against (pool.py's PoolConnectionHolder.release and Pool.release); under any
# other, every connection goes back through asyncpg's own release.
REVIEWED_ASYNCPG_RELEASES = ("0.32.",)
_RELEASE_AT_ONCE = asyncpg.__version__.startswith(REVIEWED_ASYNCPG_RELEASES)


def _release_at_once(pool: asyncpg.Pool, proxy: Any) -> bool:
    """Give a connection back to `pool` without asyncpg's release coroutine when there is
    nothing for it to do: True if done. asyncpg's `Pool.release` runs in a shielded Task
    under a timeout even when the connection is idle and sound, which cost the refresh path
    about a tenth of its CPU. This is that release's own sequence for its common case
    (`PoolConnectionHolder.release` with our no-op reset) and nothing else: any other state
    (closed, a statement or a cancellation in flight, a transaction open, a listener, the
    connection due to be recycled or of an expired generation, a reset that does something)
    returns False, and the caller lets asyncpg release it (roll back, wait for the cancel,
    or drop it). Also False if asyncpg's internals are not the ones this was written for.
    """
    if not _RELEASE_AT_ONCE:
        return False
    try:
        holder = proxy._holder
        con = proxy._con
        if con is None:
            return True  # released already
        protocol = con._protocol
        if (
            pool._reset is not keep_session_state
            or holder._pool is not pool
            or holder._in_use is None
            or con.is_closed()
            or protocol.is_in_transaction()
            or con._top_xact is not None
            or protocol._is_cancelling()
            or protocol.queries_count >= holder._max_queries
            or holder._generation != pool._generation
            or con._listeners
            or con._log_listeners
        ):
            return False
        con._on_release()
        holder._timeout = None
        holder._release()
        holder._setup_inactive_callback()
    except AttributeError:
        return False
    return True


def _has_waiters(pool: asyncpg.Pool) -> bool:
    """True if a task waits for one of `pool`'s connections (or if that cannot be told).

    Turns must stay fair: asyncpg's free queue hands a connection to whoever asks first,
    even ahead of a waiter it has just woken. A task that gave its connection back at once
    (without asyncpg's release Task, after which the woken waiter ran first) and asked
    again in the same step would take it from under that waiter, again and again, until
    the waiter's timeout. So a connection given back to a waiter is followed by one turn of
    the event loop (the waiter runs first), and nobody takes the quick way in while anyone
    waits."""
    try:
        return any(not waiter.done() for waiter in pool._queue._getters)
    except AttributeError:
        return True


def _has_free_holder(pool: asyncpg.Pool) -> bool:
    """True if `pool.acquire()` cannot wait for another user's connection: a holder is in
    its free queue (O(1), where `get_idle_size` walks every holder) and no task waits for
    one (see `_has_waiters`). A free holder without a live connection connects, which the
    pool's connect timeout bounds."""
    if _RELEASE_AT_ONCE:
        try:
            free: bool = pool._queue.qsize() > 0
        except AttributeError:
            pass
        else:
            return free and not _has_waiters(pool)
    return bool(pool.get_idle_size() > 0)


async def connections_available(conn: asyncpg.Connection) -> int:
    """How many connections the database takes from roles that are not superusers."""
    available: int = await conn.fetchval(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
    )
    return available


class PooledConnection:
    """`async with`: a connection from the pool, given back at the end; database errors
    mapped to `DatabaseUnavailable`. A connection is taken without asyncpg's timeout
    machinery (a `wait_for` Task) when one is idle, so no wait can happen; otherwise the
    wait (and any connecting) is bounded by the statement timeout as before. A sound idle
    connection goes back at once (`_release_at_once`); anything else through asyncpg's
    release, which rolls back, waits out a cancellation or drops the connection."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        pool = self._pool
        try:
            if _has_free_holder(pool):
                self._conn = await pool.acquire()
            else:
                self._conn = await pool.acquire(timeout=self._timeout)
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            # A standby (or a server made read-only): no write will succeed on this
            # session. Dropped, so that the pool connects again, which with
            # target_session_attrs=read-write finds the primary.
            conn.terminate()
        handed_to_waiter = _has_waiters(self._pool)
        if _release_at_once(self._pool, conn):
            if handed_to_waiter:
                await asyncio.sleep(0)  # the waiter it woke takes it before we go on
        else:
            try:
                await self._pool.release(conn, timeout=self._timeout)
            except UNAVAILABLE_ERRORS as release_exc:
                if exc is None:
                    raise DatabaseUnavailable() from release_exc
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            raise DatabaseUnavailable() from exc
        if isinstance(exc, UNAVAILABLE_ERRORS):
            raise DatabaseUnavailable() from exc


class StoreBase:
    """A pool, a statement timeout and the window of aggregated security events."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float, event_window: float = 300) -> None:
        self._pool = pool
        self._timeout = timeout
        # Repeats of an aggregated event within one such window share a row.
        self._event_window = event_window

    def _connection(self) -> PooledConnection:
        """A pooled connection for one use (`async with`), database errors mapped."""
        return PooledConnection(self._pool, self._timeout)

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
