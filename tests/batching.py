"""Fresh rotations held in a batch, for tests: sessions written as rows, and a process's
batch in flight held by a refresh blocked on a row lock, so that the refreshes started
meanwhile (fewer than a full batch) wait in the process and go, once the lock is let go,
in one statement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import asyncpg

from service.domain.records import CallerInfo
from service.domain.refresh_tokens import hash_token, new_refresh_token
from service.domain.tokens import TokenPair, TokenService

CALLER = CallerInfo(peer="ipv4:192.0.2.7:5000")


async def insert_user(conn: asyncpg.Connection, now: datetime) -> uuid.UUID:
    """An enabled user whose bound covers the access tokens signed now."""
    user_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO users (id, username, username_key, password_hash, scopes, disabled,
                              created_at, updated_at, session_generation, access_expires_max)
           VALUES ($1, $2, $2, 'x', '{read}', false, $3, $3, 0, $4)""",
        user_id,
        f"b-{user_id.hex}",
        now - timedelta(hours=2),
        now + timedelta(days=1),
    )
    return user_id


async def insert_sessions(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, count: int, audience: str, now: datetime
) -> list[str]:
    """`count` live sessions of `user_id`, each with its one fresh refresh token."""
    tokens = []
    for _ in range(count):
        session_id, token = uuid.uuid4(), new_refresh_token()
        await conn.execute(
            """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                     access_expires_max, user_generation)
               VALUES ($1, $2, '{read}', $3, $4, $5, $4, 0)""",
            session_id,
            user_id,
            audience,
            now - timedelta(hours=1),
            now + timedelta(days=1),
        )
        await conn.execute(
            """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
               VALUES ($1, $2, $3, $4)""",
            hash_token(token),
            session_id,
            now - timedelta(hours=1),
            now + timedelta(hours=1),
        )
        tokens.append(token)
    return tokens


async def wait_for_lock_waiters(watcher: asyncpg.Connection, count: int) -> None:
    """Until `count` backends of this database wait on a lock (at most ~10 s)."""
    for _ in range(1000):
        waiting = await watcher.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'"""
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} statements waited on a lock")


@asynccontextmanager
async def batch_in_flight_held(
    dsn: str, tokens: TokenService, *, now: datetime
) -> AsyncIterator[list[asyncio.Task[TokenPair]]]:
    """Inside: `tokens`' store has a batch in flight, a refresh (of a session written here)
    whose statement waits for a row lock held by this block, so that refreshes started
    inside (fewer than a full batch) wait in the process. On leaving, the lock goes, and
    they go together. Gives the blocked refresh's task (in a list; awaited on leaving,
    unless done)."""
    audience = sorted(tokens.issuable_audiences)[0]
    locker = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    pilots: list[asyncio.Task[TokenPair]] = []
    try:
        user_id = await insert_user(locker, now)
        pilot_tokens = await insert_sessions(locker, user_id, count=1, audience=audience, now=now)
        lock = locker.transaction()
        await lock.start()
        await locker.execute(
            "SELECT 1 FROM refresh_tokens WHERE token_hash = ANY($1) FOR UPDATE",
            [hash_token(token) for token in pilot_tokens],
        )
        pilots = [
            asyncio.create_task(tokens.refresh(token, caller=CALLER)) for token in pilot_tokens
        ]
        await wait_for_lock_waiters(watcher, 1)
        try:
            yield pilots
        finally:
            await lock.rollback()
        for pilot in pilots:
            if not pilot.cancelled():
                assert (await pilot).session_id
    finally:
        for pilot in pilots:
            if not pilot.done():
                pilot.cancel()
        await asyncio.gather(*pilots, return_exceptions=True)
        await locker.close()
        await watcher.close()
