"""The store's pooled connections (`service.store.base.PooledConnection`): an idle, sound
connection is taken and given back without asyncpg's timeout and shield machinery; anything
else (a cancellation mid-statement, an open transaction, a killed connection) still goes
through asyncpg's release, and the next user gets a clean, working connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from service.database import create_pool
from service.errors import DatabaseUnavailable
from service.settings import Settings
from service.store.base import REVIEWED_ASYNCPG_RELEASES, StoreBase, _release_at_once


class _Store(StoreBase):
    """The base's connection helpers, made callable from a test."""

    async def value(self, sql: str, *args: object) -> object:
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def in_transaction(self, sql: str) -> object:
        async with self._transaction() as conn:
            return await conn.fetchval(sql)

    async def outside_transaction(self) -> bool:
        async with self._connection() as conn:
            return not conn.is_in_transaction()

    async def backend_pid(self) -> int:
        async with self._connection() as conn:
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            return pid


@pytest.fixture
async def one_connection_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection: every use gets the connection the last one gave back."""
    pool = await create_pool(settings.database_url or "", replace(settings, db_pool_size=1))
    try:
        yield pool
    finally:
        await pool.close()


def _ignore(*_: object) -> None:
    pass


async def _assert_clean(store: _Store) -> None:
    """The connection answers its own statement (no unread answer of an earlier one) and is
    outside any transaction."""
    assert await store.value("SELECT $1::int + 1", 41) == 42
    assert await store.outside_transaction()


async def test_sound_connection_goes_back_at_once_and_is_reused(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = _Store(one_connection_pool, timeout=5.0)
    first = await store.backend_pid()
    assert one_connection_pool.get_idle_size() == 1, "given back when the block ended"
    assert await store.backend_pid() == first
    await _assert_clean(store)


async def test_release_at_once_refuses_every_state_that_needs_asyncpg(
    one_connection_pool: asyncpg.Pool,
) -> None:
    """Each state the short release must leave to asyncpg, and the sound one it takes."""
    pool = one_connection_pool
    conn = await pool.acquire()
    try:
        transaction = conn.transaction()
        await transaction.start()
        assert not _release_at_once(pool, conn), "open transaction"
        await transaction.rollback()
        await conn.execute("BEGIN")
        assert not _release_at_once(pool, conn), "transaction begun by hand"
        await conn.execute("ROLLBACK")
        await conn.add_listener("somewhere", _ignore)
        assert not _release_at_once(pool, conn), "a listener left on it"
        await conn.remove_listener("somewhere", _ignore)
        statement = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.2)
        statement.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await statement
        # asyncpg cancels the statement on the server in the background: until PostgreSQL
        # has answered, the connection has an answer to read.
        assert not _release_at_once(pool, conn), "a cancellation in flight"
    finally:
        await pool.release(conn)
    conn = await pool.acquire()
    assert _release_at_once(pool, conn)
    assert pool.get_idle_size() == 1
    assert _release_at_once(pool, conn), "released already: nothing to do"


async def test_call_cancelled_mid_statement_leaves_no_answer_for_the_next_user(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = _Store(one_connection_pool, timeout=5.0)
    slow = asyncio.create_task(store.value("SELECT 7 FROM pg_sleep(30)"))
    await asyncio.sleep(0.3)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # Within a liveness bound far below the sleep: the statement was cancelled, not awaited.
    await asyncio.wait_for(_assert_clean(store), timeout=10)


async def test_transaction_cancelled_mid_statement_is_rolled_back_before_reuse(
    one_connection_pool: asyncpg.Pool,
) -> None:
    store = _Store(one_connection_pool, timeout=5.0)
    await store.value("CREATE TABLE pooled_probe (n int)")
    slow = asyncio.create_task(
        store.in_transaction("INSERT INTO pooled_probe SELECT 1 FROM pg_sleep(30) RETURNING n")
    )
    await asyncio.sleep(0.3)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    await asyncio.wait_for(_assert_clean(store), timeout=10)
    assert await store.value("SELECT count(*) FROM pooled_probe") == 0


async def test_statement_timeout_still_bounds_a_call(settings: Settings) -> None:
    pool = await create_pool(
        settings.database_url or "", replace(settings, db_pool_size=1, db_timeout=0.5)
    )
    try:
        store = _Store(pool, timeout=0.5)
        with pytest.raises(DatabaseUnavailable):
            await store.value("SELECT pg_sleep(30)")
        await asyncio.wait_for(_assert_clean(store), timeout=10)
    finally:
        await pool.close()


async def test_busy_pool_waits_at_most_the_timeout(one_connection_pool: asyncpg.Pool) -> None:
    """The size limit holds: with its one connection taken, the next caller waits, then
    gets UNAVAILABLE after the timeout; it gets the connection once it is given back."""
    store = _Store(one_connection_pool, timeout=0.3)
    async with store._connection():
        assert one_connection_pool.get_idle_size() == 0
        with pytest.raises(DatabaseUnavailable):
            await store.value("SELECT 1")
    assert one_connection_pool.get_size() == 1
    await _assert_clean(store)


async def test_connection_killed_by_the_server_is_replaced(
    one_connection_pool: asyncpg.Pool, database_url: str
) -> None:
    store = _Store(one_connection_pool, timeout=5.0)
    victim = await store.backend_pid()
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim) is True
    finally:
        await admin.close()

    async def recovered() -> int:
        # The first call may still find the dead connection (UNAVAILABLE); it is dropped,
        # and a later one gets a new connection.
        while True:
            try:
                return await store.backend_pid()
            except DatabaseUnavailable:
                await asyncio.sleep(0.05)

    assert await asyncio.wait_for(recovered(), timeout=10) != victim
    await _assert_clean(store)
    assert one_connection_pool.get_size() == 1


async def test_connection_killed_mid_statement_is_unavailable_then_replaced(
    one_connection_pool: asyncpg.Pool, database_url: str
) -> None:
    store = _Store(one_connection_pool, timeout=5.0)
    victim = await store.backend_pid()
    slow = asyncio.create_task(store.value("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim) is True
    finally:
        await admin.close()
    with pytest.raises(DatabaseUnavailable):
        await asyncio.wait_for(slow, timeout=10)
    assert await store.backend_pid() != victim
    await _assert_clean(store)


def test_the_short_release_was_reviewed_for_the_installed_asyncpg() -> None:
    """`_release_at_once` repeats asyncpg's release for its common case from its internals:
    a new asyncpg turns it off (every release through asyncpg, correct but slower), and
    this fails so that someone reads asyncpg's pool.py again and adds the release."""
    assert asyncpg.__version__.startswith(REVIEWED_ASYNCPG_RELEASES), asyncpg.__version__


async def test_a_task_giving_a_connection_back_cannot_take_it_again_before_those_waiting(
    settings: Settings,
) -> None:
    """Fair turns: a task that gives its connection back and at once asks for one again
    (a login's statements one after another) must not take it from under a task already
    waiting, or waiting tasks starve until their timeout (DatabaseUnavailable) while the
    pool is busy but never unavailable."""
    pool = await create_pool(settings.database_url or "", replace(settings, db_pool_size=2))
    # Each task's turns add up to several times the timeout: a task passed over again and
    # again would wait past it.
    store = _Store(pool, timeout=0.5)
    turns = 0

    async def statements_one_after_another() -> None:
        nonlocal turns
        for _ in range(150):
            await store.value("SELECT pg_sleep(0.001)")
            turns += 1

    try:
        await asyncio.gather(*(statements_one_after_another() for _ in range(16)))
    finally:
        await pool.close()
    assert turns == 16 * 150
