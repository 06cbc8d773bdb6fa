"""The database round trips of Refresh and Issue, counted at the asyncpg level: every
statement the service sends on its pool (a query logger on each connection of a pool made
as the server makes it, `service.database.create_pool`), through the real domain and
store. A statement asyncpg has prepared on the connection before is one round trip
(bind, execute and sync go out together); the first use of each statement on a connection
costs one more (the prepare), once, which is why each count is taken after a warm-up.
BEGIN and COMMIT are statements of their own, and are counted; so would be the pool's
reset on release, which the service turns off (`create_pool`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from service.clock import ManualClock
from service.components import Components, build_components
from service.database import create_pool
from service.domain.records import CallerInfo
from service.settings import Settings
from service.store.refresh_tokens import ROTATE_FRESH_TOKEN_SQL

CALLER = CallerInfo(peer="ipv4:192.0.2.7:5000")
PASSWORD = "correct horse battery staple"


@dataclass
class Counted:
    components: Components
    queries: list[str]

    async def sent_by(self, call: object) -> list[str]:
        """The statements sent while awaiting `call`."""
        self.queries.clear()
        assert asyncio.iscoroutine(call)
        await call
        await asyncio.sleep(0)  # query loggers are called soon after each query
        return list(self.queries)


@pytest.fixture
async def counted(settings: Settings) -> AsyncIterator[Counted]:
    sized = replace(settings, db_pool_size=2)
    pool = await create_pool(settings.database_url or "", sized)
    queries: list[str] = []
    try:
        # Both connections of the pool (min_size = max_size = 2) log every statement.
        async with pool.acquire() as first, pool.acquire() as second:
            for conn in (first, second):
                conn.add_query_logger(lambda record: queries.append(record.query))
        components = await build_components(sized, pool=pool, clock=ManualClock(start=1.9e9))
        await components.users.create("counted", PASSWORD, ("read",))
        yield Counted(components, queries)
    finally:
        await pool.close()


async def _login(c: Counted) -> list[str]:
    return await c.sent_by(
        c.components.tokens.issue(
            username="counted", password=PASSWORD, scopes=(), audience=None, caller=CALLER
        )
    )


async def test_a_fresh_refresh_is_one_round_trip(counted: Counted) -> None:
    """Refresh of a fresh token (unused, unexpired, its session live, its user enabled):
    one statement, ROTATE_FRESH_TOKEN_SQL, in autocommit (no BEGIN or COMMIT). Before it,
    four: BEGIN, the lock, the rotation, COMMIT, and the pool's reset on release."""
    tokens = counted.components.tokens
    pair = await tokens.issue(
        username="counted", password=PASSWORD, scopes=(), audience=None, caller=CALLER
    )
    warm = await tokens.refresh(pair.refresh_token, caller=CALLER)  # prepares on a connection
    for _ in range(4):  # over both connections of the pool
        sent = await counted.sent_by(tokens.refresh(warm.refresh_token, caller=CALLER))
        warm = await tokens.refresh(warm.refresh_token, caller=CALLER)
        assert sent == [ROTATE_FRESH_TOKEN_SQL]


async def test_a_login_is_ten_round_trips(counted: Counted) -> None:
    """Issue (throttle on, a user within the session cap, a hash of current parameters):
    ten statements (fourteen before the pool's reset was turned off), in three steps that
    the rules keep apart.

    1. The throttle's reservation, before the password is checked: BEGIN, the keys' rows
       locked and read, the counts written, COMMIT (4). The decision is the domain's
       (`LoginThrottle.reserve`) and is made under the rows' lock, between the statements.
    2. The user's row (1); the password check (no database); the reservation settled (1),
       in the check's own task, so that a check whose caller gave up still takes its
       count back.
    3. The session: BEGIN, the session with its first token and the login event (one
       statement, under the user's row lock), the cap's evictions, COMMIT (4). The
       evictions read the user's sessions after that lock is held, so in a statement of
       their own: in the first one's snapshot a concurrent login of the same user would be
       missed, and the cap overrun.
    """
    await _login(counted)  # prepares the statements on a connection
    await _login(counted)
    sent = await _login(counted)
    assert [q.split()[0] for q in sent].count("BEGIN;") == 2, sent
    assert len(sent) == 10, sent
