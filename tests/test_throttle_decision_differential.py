"""The throttle's reservation in SQL against its specification: generated states of a login
attempt's two keys (a username's, an address's) are written into PostgreSQL, the attempt is
reserved through the real `LoginThrottle` over the real store (one statement, the function
of migration 0013), and the outcome and the rows written must be what the pure
`decide_reservation` says for the same state, every time: a wait (LoginThrottled with the
same retry), busy (nothing counted, nothing written), or counted (each key's failures and
pending as the rule says, stamped now); a refused attempt (a wait, or busy) leaves no row
for a key that had none. `LoginThrottle.reserve` also refuses to go on when
the statement counted an attempt the rule would not, or the reverse (RuntimeError).

Plain sync tests driving a private event loop (as tests/test_refresh_decision_differential.py),
so that hypothesis runs each example with `run_until_complete`; examples are derandomized.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.clock import ManualClock, to_datetime
from service.database import create_pool
from service.domain.records import ThrottleState
from service.domain.throttle import (
    PENDING_EXPIRY,
    LoginThrottle,
    Reservation,
    ThrottlePolicy,
    decide_reservation,
)
from service.errors import LoginThrottled
from service.settings import Settings
from service.store.throttle import PostgresThrottle

NOW = 1_900_000_000.0
WINDOW = 3600.0
POLICIES = {
    "user": ThrottlePolicy(free_failures=2, window=WINDOW),
    "peer": ThrottlePolicy(free_failures=3, window=WINDOW),
}
KEYS = ["user:alice", "peer:192.0.2.7"]


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    pool: asyncpg.Pool
    throttle: LoginThrottle


@pytest.fixture
def harness(settings: Settings) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(
        create_pool(settings.database_url or "", replace(settings, db_pool_size=2))
    )
    throttle = LoginThrottle(
        store=PostgresThrottle(pool, timeout=5.0),
        clock=ManualClock(start=NOW),
        user_policy=POLICIES["user"],
        peer_policy=POLICIES["peer"],
    )
    try:
        yield Harness(loop, pool, throttle)
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def _at(seconds: float) -> object:
    return to_datetime(NOW + seconds)


# Offsets from now (seconds) near each edge the rule has.
window_edges = st.sampled_from([-2 * WINDOW, -WINDOW - 1, -WINDOW, -WINDOW + 1, -10, 0])
pending_edges = st.sampled_from(
    [-2 * PENDING_EXPIRY, -PENDING_EXPIRY - 1, -PENDING_EXPIRY, -PENDING_EXPIRY + 1, -1, 0]
)
lock_edges = st.sampled_from([-600, -1, 0, 1, 900])


@st.composite
def key_rows(draw: st.DrawFn, key: str) -> ThrottleState | None:
    """A key's row as it may be found, or None (no row yet)."""
    if draw(st.integers(0, 5)) == 0:
        return None
    return ThrottleState(
        key=key,
        failures=draw(st.integers(0, 6)),
        last_failure_at=to_datetime(NOW + draw(window_edges)),
        locked_until=draw(st.one_of(st.none(), lock_edges.map(lambda s: to_datetime(NOW + s)))),
        pending=draw(st.integers(0, 4)),
        pending_at=draw(st.one_of(st.none(), pending_edges.map(lambda s: to_datetime(NOW + s)))),
    )


async def _write(pool: asyncpg.Pool, rows: list[ThrottleState | None]) -> None:
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM login_throttle")
        for row in rows:
            if row is not None:
                await conn.execute(
                    """INSERT INTO login_throttle
                              (key, failures, last_failure_at, locked_until, pending, pending_at)
                       VALUES ($1, $2, $3, $4, $5, $6)""",
                    row.key,
                    row.failures,
                    row.last_failure_at,
                    row.locked_until,
                    row.pending,
                    row.pending_at,
                )


async def _read(pool: asyncpg.Pool) -> dict[str, tuple[object, ...]]:
    rows = await pool.fetch(
        """SELECT key, failures, last_failure_at, locked_until, pending, pending_at
             FROM login_throttle"""
    )
    return {r["key"]: tuple(r.values())[1:] for r in rows}


def _check(h: Harness, user_row: ThrottleState | None, peer_row: ThrottleState | None) -> None:
    h.loop.run_until_complete(_write(h.pool, [user_row, peer_row]))
    rows_given = [row for row in (user_row, peer_row) if row is not None]
    # The states the rule sees: a missing row is made as (0 failures, now, unlocked, none
    # pending), in key order as the store returns them.
    found = {
        key: row or ThrottleState(key, 0, to_datetime(NOW), None, 0, None)
        for key, row in zip(KEYS, [user_row, peer_row], strict=True)
    }
    states = [found[key] for key in sorted(found)]
    policies = {key: POLICIES[key.partition(":")[0]] for key in KEYS}
    expected = decide_reservation(states, policies, now=NOW)

    outcome: Reservation | LoginThrottled | None
    try:
        outcome, _ = h.loop.run_until_complete(h.throttle.reserve(KEYS))
    except LoginThrottled as throttled:
        outcome = throttled
    after = h.loop.run_until_complete(_read(h.pool))

    before = {
        s.key: (s.failures, s.last_failure_at, s.locked_until, s.pending, s.pending_at)
        for s in states
    }
    # A refused attempt (a wait, or busy) writes nothing: not even the rows of keys it had
    # not seen (migration 0018).
    unchanged = {key: before[key] for key in before if key in {r.key for r in rows_given}}
    if expected.locked_until is not None:
        assert isinstance(outcome, LoginThrottled)
        assert outcome.retry_after == expected.locked_until.timestamp() - NOW
        assert after == unchanged
    elif expected.counts is None:
        assert outcome is None
        assert after == unchanged
    else:
        assert isinstance(outcome, Reservation)
        assert outcome.failures == {k: f for k, (f, _) in expected.counts.items()}
        assert after == {
            s.key: (
                expected.counts[s.key][0],
                to_datetime(NOW),
                s.locked_until,
                expected.counts[s.key][1],
                to_datetime(NOW),
            )
            for s in states
        }


@hypothesis_settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(user_row=key_rows(KEYS[0]), peer_row=key_rows(KEYS[1]))
def test_the_reservation_in_postgresql_decides_as_decide_reservation(
    harness: Harness, user_row: ThrottleState | None, peer_row: ThrottleState | None
) -> None:
    _check(harness, user_row, peer_row)


def _row(key: str, **changes: object) -> ThrottleState:
    base = ThrottleState(key, 0, to_datetime(NOW - 10), None, 0, None)
    return replace(base, **changes)  # type: ignore[arg-type]


U, P = KEYS
NAMED = {
    "no rows yet": (None, None),
    "counted": (_row(U, failures=1), _row(P, failures=2)),
    "user key waits": (_row(U, failures=3, locked_until=to_datetime(NOW + 1)), None),
    "a wait that just ended": (_row(U, failures=3, locked_until=to_datetime(NOW)), None),
    "both wait, the later retry": (
        _row(U, locked_until=to_datetime(NOW + 5)),
        _row(P, locked_until=to_datetime(NOW + 9)),
    ),
    "busy: over the allowance with checks pending": (
        _row(U, failures=3, pending=1, pending_at=to_datetime(NOW - 1)),
        None,
    ),
    "pending but within the allowance": (
        _row(U, failures=2, pending=2, pending_at=to_datetime(NOW - 1)),
        None,
    ),
    "a stale pending count is ignored": (
        _row(U, failures=3, pending=3, pending_at=to_datetime(NOW - PENDING_EXPIRY - 1)),
        None,
    ),
    "failures past the window are forgotten": (
        _row(
            U,
            failures=6,
            last_failure_at=to_datetime(NOW - WINDOW - 1),
            pending=1,
            pending_at=to_datetime(NOW - 1),
        ),
        None,
    ),
    "pending counts raise the failures": (
        _row(U, failures=0, pending=2, pending_at=to_datetime(NOW)),
        _row(P, failures=4, pending=4, pending_at=to_datetime(NOW - PENDING_EXPIRY)),
    ),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_the_reservation_in_postgresql_decides_as_decide_reservation_in_named_cases(
    harness: Harness, name: str
) -> None:
    """The edges, each named once, whatever the generator reaches."""
    _check(harness, *NAMED[name])
