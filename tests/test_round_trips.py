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

import asyncpg
import pytest

from service.clock import ManualClock
from service.components import Components, build_components
from service.database import create_pool
from service.domain.records import CallerInfo
from service.settings import Settings
from service.store.refresh_tokens import ROTATE_FRESH_TOKEN_SQL
from service.store.sessions import START_SESSION_SQL
from service.store.throttle import RESERVE_LOGIN_ATTEMPT_SQL

CALLER = CallerInfo(peer="ipv4:192.0.2.7:5000")
PASSWORD = "correct horse battery staple"


@dataclass
class Counted:
    components: Components
    queries: list[str]
    pool: asyncpg.Pool

    async def sent_by(self, call: object) -> list[str]:
        """The statements sent while awaiting `call`."""
        # asyncpg calls query loggers soon after each query (loop.call_soon): let those of
        # the statements sent before run first (a call may return without yielding after
        # its last statement: the pool gives a connection back without a Task).
        await asyncio.sleep(0)
        self.queries.clear()
        assert asyncio.iscoroutine(call)
        await call
        await asyncio.sleep(0)  # query loggers are called soon after each query
        return list(self.queries)


@pytest.fixture(params=[100])
async def counted(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Counted]:
    """Components on a counted pool, with a session cap of `request.param`."""
    sized = replace(settings, db_pool_size=2, max_sessions_per_user=request.param)
    pool = await create_pool(settings.database_url or "", sized)
    queries: list[str] = []
    try:
        # Both connections of the pool (min_size = max_size = 2) log every statement.
        async with pool.acquire() as first, pool.acquire() as second:
            for conn in (first, second):
                conn.add_query_logger(lambda record: queries.append(record.query))
        components = await build_components(sized, pool=pool, clock=ManualClock(start=1.9e9))
        await components.users.create("counted", PASSWORD, ("read",))
        yield Counted(components, queries, pool)
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


async def test_a_login_is_two_round_trips(counted: Counted) -> None:
    """Issue (throttle on, a user within the session cap, a hash of current parameters):
    two statements, each in autocommit (two commits). It was four (seven before the
    throttle's reservation was one function, ten before the session's was, fourteen before
    the pool's reset was turned off). Two is what the rules allow: the password check (the
    slow hash) must come after the reservation and before the session, so each side of it
    is one round trip.

    1. The throttle's reservation and the user's row: one call of `reserve_login_attempt`
       (migrations 0013 and 0015): the keys' rows locked (no row written for that),
       `decide_reservation` applied in SQL under the lock, the counts written, then the
       user's row read (for a counted attempt). The rule stays the domain's, which judges
       the rows returned again (the differential test holds the two together).
    2. The password check (no database), then the session: one call of `start_session`
       (migrations 0012 and 0015): the user's row locked, the session with its first token
       and the login event, then the cap's evictions read in a statement of their own (a
       function's statements each take a new snapshot in READ COMMITTED; in one
       statement's snapshot a concurrent login of the same user would be missed, and the
       cap overrun), their log rows and events, and last the reservation settled as a
       success (before, a round trip and a commit of its own).
    """
    await _login(counted)  # prepares the statements on a connection
    await _login(counted)
    sent = await _login(counted)
    assert sent == [RESERVE_LOGIN_ATTEMPT_SQL, START_SESSION_SQL], sent


@pytest.mark.parametrize("counted", [100], indirect=True)
async def test_a_login_without_the_throttle_is_two_round_trips(
    counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the throttle off (AUTH_LOGIN_THROTTLE=off): the user's row alone, then the
    session, with nothing to settle."""
    monkeypatch.setattr(counted.components.logins, "_throttle", None)
    await _login(counted)
    await _login(counted)
    sent = await _login(counted)
    assert len(sent) == 2, sent
    assert "FROM users WHERE username_key" in sent[0], sent
    assert sent[1] == START_SESSION_SQL, sent


@pytest.mark.parametrize("counted", [2], indirect=True)
async def test_a_login_past_the_cap_starts_its_session_in_one_round_trip(
    counted: Counted,
) -> None:
    """With a session cap of 2, each login past it revokes the oldest session: the
    evictions, their revocation-log rows and their events add no round trip (before, they
    added three: the log rows and one event per eviction)."""
    for _ in range(3):  # prepares the statements on both connections, and fills the cap
        await _login(counted)
    revoked = "SELECT count(*) FROM sessions WHERE revoke_reason = 'session_limit'"
    logged = "SELECT count(*) FROM revocation_log WHERE kind = 'session'"
    before = (await counted.pool.fetchval(revoked), await counted.pool.fetchval(logged))
    sent = await _login(counted)
    assert sent == [RESERVE_LOGIN_ATTEMPT_SQL, START_SESSION_SQL], sent
    after = (await counted.pool.fetchval(revoked), await counted.pool.fetchval(logged))
    assert after == (before[0] + 1, before[1] + 1)
