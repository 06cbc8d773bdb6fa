"""Fresh rotations sent in batches (`service.store.fresh_rotations`), through the real
`TokenService` over the real store and PostgreSQL, every statement logged on the pool:
refreshes that arrive while batches are in flight share a statement, each caller still gets
its own answer, the same token never goes twice in one statement, a caller leaving does not
stop the others, and a statement PostgreSQL refuses fails only the item that caused it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg
import pytest

from service.clock import ManualClock, to_datetime
from service.components import Components, build_components
from service.database import create_pool
from service.domain.refresh_tokens import derive_child_token, hash_token
from service.domain.tokens import TokenPair
from service.settings import Settings
from service.store.fresh_rotations import MAX_BATCH_SIZE, MAX_BATCHES_IN_FLIGHT, STUCK_AFTER
from service.store.refresh_tokens import LOCK_REFRESH_TOKEN_SQL, ROTATE_FRESH_TOKEN_SQL
from tests.batching import (
    CALLER,
    batch_in_flight_held,
    insert_sessions,
    insert_user,
    wait_for_lock_waiters,
)

POOL_SIZE = MAX_BATCHES_IN_FLIGHT + 2


@dataclass
class Logged:
    components: Components
    pool: asyncpg.Pool
    dsn: str
    clock: ManualClock
    statements: list[asyncpg.connection.LoggedQuery]

    def now(self) -> datetime:
        return to_datetime(self.clock.now())

    def rotations(self, tokens: list[str]) -> list[list[bytes]]:
        """The tokens of each ROTATE_FRESH_TOKEN_SQL logged that held one of `tokens`, in
        the order they came back (the held batches' own come back during the test)."""
        hashes = set(map(hash_token, tokens))
        batches = [
            [bytes(token_hash) for token_hash in logged.args[0]]
            for logged in self.statements
            if logged.query == ROTATE_FRESH_TOKEN_SQL
        ]
        return [batch for batch in batches if hashes.intersection(batch)]

    async def sessions(self, count: int) -> list[str]:
        """`count` live sessions of three users in turn: their fresh tokens."""
        audience = sorted(self.components.tokens.issuable_audiences)[0]
        async with self.pool.acquire() as conn:
            users = [await insert_user(conn, self.now()) for _ in range(3)]
            tokens = []
            for index in range(count):
                tokens += await insert_sessions(
                    conn, users[index % 3], count=1, audience=audience, now=self.now()
                )
        return tokens

    async def token_rows(self, token: str) -> list[asyncpg.Record]:
        """The rows of the family of `token`'s session."""
        rows: list[asyncpg.Record] = await self.pool.fetch(
            """SELECT t.* FROM refresh_tokens t
                WHERE t.session_id = (SELECT session_id FROM refresh_tokens
                                       WHERE token_hash = $1)
                ORDER BY t.issued_at""",
            hash_token(token),
        )
        return rows


@pytest.fixture
async def logged(settings: Settings) -> AsyncIterator[Logged]:
    sized = replace(settings, db_pool_size=POOL_SIZE)
    statements: list[asyncpg.connection.LoggedQuery] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        # On every connection the pool opens, those that replace a closed one too (after a
        # cancelled statement the pool may close its connection): none goes unlogged.
        conn.add_query_logger(statements.append)

    pool = await create_pool(settings.database_url or "", sized, init=log_queries)
    clock = ManualClock(start=1.9e9)
    try:
        components = await build_components(sized, pool=pool, clock=clock)
        yield Logged(components, pool, settings.database_url or "", clock, statements)
    finally:
        await pool.close()


async def _refresh_all(logged: Logged, tokens: list[str]) -> list[TokenPair | BaseException]:
    refresh = logged.components.tokens.refresh
    return await asyncio.gather(
        *(refresh(token, caller=CALLER) for token in tokens), return_exceptions=True
    )


def _secret(logged: Logged) -> bytes:
    return logged.components.tokens._refresh_secret


async def _assert_rotated_once(logged: Logged, token: str, pair: TokenPair) -> None:
    """`pair` is `token`'s child, stored as its one child, unused."""
    assert pair.refresh_token == derive_child_token(token, _secret(logged))
    rows = await logged.token_rows(token)
    assert [bytes(row["token_hash"]) for row in rows] == [
        hash_token(token),
        hash_token(pair.refresh_token),
    ]
    assert rows[0]["used_at"] is not None
    assert bytes(rows[0]["child_hash"]) == hash_token(pair.refresh_token)
    assert rows[1]["used_at"] is None


async def test_refreshes_started_together_share_statements_and_each_rotates_once(
    logged: Logged,
) -> None:
    tokens = await logged.sessions(40)
    await asyncio.sleep(0)
    logged.statements.clear()
    results = await _refresh_all(logged, tokens)
    await asyncio.sleep(0)  # query loggers are called soon after each query
    assert all(isinstance(result, TokenPair) for result in results), results
    rotations = logged.rotations(tokens)
    # Fewer statements than refreshes, every token in exactly one of them.
    assert len(rotations) < len(tokens)
    assert max(len(batch) for batch in rotations) > 1
    assert sorted(hash for batch in rotations for hash in batch) == sorted(map(hash_token, tokens))
    assert LOCK_REFRESH_TOKEN_SQL not in [statement.query for statement in logged.statements]
    for token, pair in zip(tokens, results, strict=True):
        assert isinstance(pair, TokenPair)
        await _assert_rotated_once(logged, token, pair)


async def test_refreshes_waiting_for_a_batch_go_in_one_statement(logged: Logged) -> None:
    tokens = await logged.sessions(9)
    async with batch_in_flight_held(logged.dsn, logged.components.tokens, now=logged.now()):
        calls = asyncio.gather(
            *(logged.components.tokens.refresh(t, caller=CALLER) for t in tokens)
        )
        await asyncio.sleep(0.05)
        assert not calls.done()  # all of them wait in the process
        logged.statements.clear()
    results = await calls
    await asyncio.sleep(0)
    assert [set(batch) for batch in logged.rotations(tokens)] == [set(map(hash_token, tokens))]
    for token, pair in zip(tokens, results, strict=True):
        await _assert_rotated_once(logged, token, pair)


async def test_the_same_token_twice_at_once_rotates_once_and_replays_once(
    logged: Logged,
) -> None:
    """The same token twice among others: never twice in one statement (it would be
    rotated twice); the later one goes in a later batch, finds it used, and takes the
    path of a used token: a replay within the grace window, the same child."""
    tokens = await logged.sessions(6)
    twice = tokens[2]
    async with batch_in_flight_held(logged.dsn, logged.components.tokens, now=logged.now()):
        refresh = logged.components.tokens.refresh
        calls = asyncio.gather(*(refresh(token, caller=CALLER) for token in [*tokens, twice]))
        await asyncio.sleep(0.05)
        logged.statements.clear()
    results = await calls
    await asyncio.sleep(0)
    rotations = logged.rotations(tokens)
    assert all(len(set(batch)) == len(batch) for batch in rotations)
    assert [hash_token(twice) in batch for batch in rotations] == [True, True]
    assert set(rotations[0]) == set(map(hash_token, tokens))  # the others went in the first
    # Both calls of `twice` got the one child; it was stored once.
    assert results[2] == replace(results[-1], access_token=results[2].access_token)
    replays = [s for s in logged.statements if s.query == LOCK_REFRESH_TOKEN_SQL]
    assert [[bytes(h) for h in s.args[0]] for s in replays] == [[hash_token(twice)]]
    for token, pair in zip(tokens, results, strict=False):
        await _assert_rotated_once(logged, token, pair)
    assert (
        await logged.pool.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
        == 0
    )


async def test_a_batch_postgresql_refuses_fails_only_the_item_that_caused_it(
    logged: Logged,
) -> None:
    """A trigger refuses one child's insert (a real PostgreSQL error, as a deadlock or a
    broken constraint would be): the batch rolls back entirely, each item goes again alone,
    and only the refused one fails; the others rotate as if alone."""
    tokens = await logged.sessions(7)
    refused = tokens[3]
    refused_child = hash_token(derive_child_token(refused, _secret(logged)))
    await logged.pool.execute(
        f"""CREATE FUNCTION refuse_child() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
            CREATE TRIGGER refuse_child BEFORE INSERT ON refresh_tokens FOR EACH ROW
             WHEN (NEW.token_hash = '\\x{refused_child.hex()}'::bytea)
             EXECUTE FUNCTION refuse_child()"""
    )
    async with batch_in_flight_held(logged.dsn, logged.components.tokens, now=logged.now()):
        refresh = logged.components.tokens.refresh
        calls = asyncio.gather(
            *(refresh(token, caller=CALLER) for token in tokens), return_exceptions=True
        )
        await asyncio.sleep(0.05)
        logged.statements.clear()
    results = await calls
    await asyncio.sleep(0)
    refused_statements = [s for s in logged.statements if s.exception is not None]
    assert [s.query for s in refused_statements] == [ROTATE_FRESH_TOKEN_SQL] * 2
    rotations = logged.rotations(tokens)
    assert set(rotations[0]) == set(map(hash_token, tokens))
    assert sorted(batch for batch in rotations[1:]) == sorted([hash_token(t)] for t in tokens)
    for token, result in zip(tokens, results, strict=True):
        if token == refused:
            assert isinstance(result, asyncpg.RaiseError), result
            rows = await logged.token_rows(token)
            assert len(rows) == 1 and rows[0]["used_at"] is None  # nothing written
        else:
            assert isinstance(result, TokenPair), result
            await _assert_rotated_once(logged, token, result)


async def test_callers_that_leave_stop_only_their_own_work(logged: Logged) -> None:
    """A caller cancelled while its item waits in the process: the item is never sent. A
    batch whose every caller left while its statement ran: the statement is cancelled (a
    deadline stops the database work done for that call alone, as before batches). A
    batch some of whose callers are still there: it goes on for them (and rotates the
    left one's token too; nobody gets that child)."""
    alone, waits, leaves, stays = await logged.sessions(4)
    refresh = logged.components.tokens.refresh
    locker = await asyncpg.connect(logged.dsn)
    watcher = await asyncpg.connect(logged.dsn)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute(
            "SELECT 1 FROM refresh_tokens WHERE token_hash = ANY($1) FOR UPDATE",
            [hash_token(token) for token in (alone, leaves, stays)],
        )
        first = asyncio.create_task(refresh(alone, caller=CALLER))
        await wait_for_lock_waiters(watcher, 1)  # its batch (of one) waits for the lock
        calls = {t: asyncio.create_task(refresh(t, caller=CALLER)) for t in (waits, leaves, stays)}
        await asyncio.sleep(0.05)
        calls[waits].cancel()  # waiting in the process
        await asyncio.sleep(0.05)
        logged.statements.clear()
        first.cancel()  # every caller of the batch in flight left: its statement stops
        for _ in range(200):  # at once, not at the statement's timeout
            if logged.rotations([alone]):  # logged when it ended (cancelled)
                break
            await asyncio.sleep(0.01)
        assert [batch for batch in logged.rotations([alone])] == [[hash_token(alone)]]
        assert logged.statements[0].exception is not None
        await wait_for_lock_waiters(watcher, 1)  # the next batch: leaves and stays
        assert logged.rotations([leaves, stays]) == []  # sent, not back
        calls[leaves].cancel()  # one of two callers left: the statement goes on
        await asyncio.sleep(0.05)
        assert not calls[stays].done()
        await lock.rollback()
        pair = await calls[stays]
    finally:
        await locker.close()
        await watcher.close()
    assert first.cancelled() and calls[waits].cancelled() and calls[leaves].cancelled()
    await _assert_rotated_once(logged, stays, pair)
    assert [set(batch) for batch in logged.rotations([leaves, stays])] == [
        {hash_token(leaves), hash_token(stays)}
    ]
    for fresh in (alone, waits):
        rows = await logged.token_rows(fresh)
        assert len(rows) == 1 and rows[0]["used_at"] is None, "its statement was not stopped"
    rows = await logged.token_rows(leaves)
    assert rows[0]["used_at"] is not None  # rotated for nobody


async def test_a_full_batch_goes_beside_a_batch_stuck_on_a_lock(logged: Logged) -> None:
    """A batch waiting for a row lock (a transaction of someone else) does not hold up
    the process's other refreshes for as long: once a full batch waits, it goes beside
    it, and answers while the stuck one still waits."""
    tokens = await logged.sessions(MAX_BATCH_SIZE + 3)
    refresh = logged.components.tokens.refresh
    async with batch_in_flight_held(logged.dsn, logged.components.tokens, now=logged.now()) as held:
        calls = [asyncio.create_task(refresh(token, caller=CALLER)) for token in tokens]
        done, _ = await asyncio.wait(calls[:MAX_BATCH_SIZE], timeout=10)
        assert len(done) == MAX_BATCH_SIZE  # a full batch went beside the stuck one
        assert not held[0].done()
        await asyncio.sleep(0.05)
        assert not any(call.done() for call in calls[MAX_BATCH_SIZE:])  # two in flight
    results = await asyncio.gather(*calls)
    for token, pair in zip(tokens, results, strict=True):
        await _assert_rotated_once(logged, token, pair)


async def test_a_refresh_does_not_wait_long_for_a_batch_stuck_on_a_lock(logged: Logged) -> None:
    """Fewer than a full batch behind a batch stuck on a row lock wait for it only until it
    has been in flight for `STUCK_AFTER` (by the service's clock, here a manual one): then
    they go, and answer while the stuck one still waits."""
    tokens = await logged.sessions(2)
    refresh = logged.components.tokens.refresh
    async with batch_in_flight_held(logged.dsn, logged.components.tokens, now=logged.now()) as held:
        calls = [asyncio.create_task(refresh(token, caller=CALLER)) for token in tokens]
        await asyncio.sleep(STUCK_AFTER * 4)
        assert not any(call.done() for call in calls)  # the stuck batch is not old yet
        logged.clock.advance(STUCK_AFTER * 2)
        done, _ = await asyncio.wait(calls, timeout=10)
        assert len(done) == len(calls)
        assert not held[0].done()
    assert len(logged.rotations(tokens)) == 1  # the two went together
    for token, call in zip(tokens, calls, strict=True):
        await _assert_rotated_once(logged, token, call.result())
