"""The pool does not reset connections on release (service/database.py), so a session-level
advisory lock taken on a pooled connection stays with it unless let go explicitly. The
janitor takes its locks with pg_try_advisory_lock: if the call is cut short after the
database granted the lock but before the answer was read (the task cancelled at stop, or
the statement timeout firing), the lock must not go back to the pool with the connection:
every other connection's try would fail, and the janitor of every replica would stop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg

from service.database import create_pool
from service.settings import Settings
from service.store.janitor import _CATCH_UP_LOCK_ID, _JANITOR_LOCK_ID, PostgresJanitor


async def _advisory_locks_held(pool: asyncpg.Pool) -> list[int]:
    rows = await pool.fetch(
        """SELECT objid FROM pg_locks
            WHERE locktype = 'advisory' AND objid = ANY($1::oid[])
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        [_JANITOR_LOCK_ID, _CATCH_UP_LOCK_ID],
    )
    return [row["objid"] for row in rows]


async def _cancel_with_the_answer_unread(step: asyncio.Task[object]) -> None:
    """Let `step` send its first statement, give the database time to answer it, then
    cancel `step` before the event loop reads that answer."""
    for _ in range(3):
        await asyncio.sleep(0)  # acquire, then send the try-lock
    time.sleep(0.2)  # noqa: ASYNC251 - blocking on purpose: the answer must stay unread
    step.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await step


async def test_a_janitor_turn_cancelled_after_its_lock_was_granted_leaves_no_lock_held(
    database_url: str, settings: Settings
) -> None:
    pool = await create_pool(database_url, settings)
    store = PostgresJanitor(pool, timeout=5.0)
    try:
        # Prepared once, so the cancelled turn's try-lock is one round trip.
        async with store.janitor_turn() as purger:
            assert purger is not None
        assert await store.catch_up_user_revocations(batch=10, max_batches=1) == 0

        async def turn() -> object:
            async with store.janitor_turn() as purger:
                return purger

        for _ in range(5):
            await _cancel_with_the_answer_unread(asyncio.create_task(turn()))
            await _cancel_with_the_answer_unread(
                asyncio.create_task(store.catch_up_user_revocations(batch=10, max_batches=1))
            )
        # Whatever connection the pool holds now holds no janitor lock, so another
        # replica's janitor (a connection outside this pool) can take it.
        assert await _advisory_locks_held(pool) == []
        other = await asyncpg.connect(database_url)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", _JANITOR_LOCK_ID)
        finally:
            await other.close()
    finally:
        await pool.close()
