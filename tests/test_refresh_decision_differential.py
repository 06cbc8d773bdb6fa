"""Refresh's SQL path against its specification: generated token, session and user states
are written into PostgreSQL, refreshed through the real `TokenService` over the real store
(the one-statement rotation, and the transaction of several statements behind it), and
the outcome must be what the pure `decide_refresh` says for the same state, every time.

Both directions are checked: a state `decide_refresh` rotates is rotated by the one
statement alone (no statement of the slower path is sent), and a state it does not
rotate is never rotated by that statement (the service refuses to go on if it were).

The tests are plain sync functions driving a private event loop (as in
tests/security/test_fuzz.py), so that hypothesis runs each example with
`run_until_complete`; examples are derandomized.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.clock import ManualClock, to_datetime
from service.components import Components, build_components
from service.database import create_pool
from service.domain.access_tokens import token_lifetime
from service.domain.records import CallerInfo, RefreshTokenState
from service.domain.refresh_tokens import (
    RefreshDecision,
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
    decide_refresh,
    derive_child_token,
    hash_token,
    new_refresh_token,
    raised_user_bound,
)
from service.domain.tokens import TokenPair
from service.errors import AuthError, RefreshTokenReused
from service.settings import Settings
from service.store.refresh_tokens import LOCK_REFRESH_TOKEN_SQL, ROTATE_FRESH_TOKEN_SQL
from tests.batching import batch_in_flight_held

T = TypeVar("T")
GRACE = 10
IDLE_TTL = 3600
CALLER = CallerInfo(peer="ipv4:192.0.2.7:5000")


@dataclass
class Harness:
    """Two services over one database and a pool of two connections (every statement
    logged): one with a grace window, one without."""

    loop: asyncio.AbstractEventLoop
    pool: asyncpg.Pool
    clock: ManualClock
    services: dict[int, Components]
    secret: bytes
    dsn: str
    queries: list[str] = field(default_factory=list)
    logged: list[asyncpg.connection.LoggedQuery] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture
def harness(settings: Settings) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    clock = ManualClock(start=1_900_000_000.123456)
    # Two: creating the key material holds one connection while it works on another.
    two_connections = replace(settings, db_pool_size=2, refresh_idle_ttl=IDLE_TTL)
    pool = loop.run_until_complete(create_pool(settings.database_url or "", two_connections))
    queries: list[str] = []
    logged: list[asyncpg.connection.LoggedQuery] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        queries.append(record.query)
        logged.append(record)

    async def build() -> dict[int, Components]:
        async with pool.acquire() as first, pool.acquire() as second:
            for conn in (first, second):
                conn.add_query_logger(log)
        return {
            grace: await build_components(
                replace(two_connections, refresh_reuse_grace=grace), pool=pool, clock=clock
            )
            for grace in (0, GRACE)
        }

    try:
        services = loop.run_until_complete(build())
        secret = services[GRACE].tokens._refresh_secret
        yield Harness(
            loop, pool, clock, services, secret, settings.database_url or "", queries, logged
        )
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


@dataclass(frozen=True)
class Case:
    """One generated state, in seconds from now (None: the row or time is absent)."""

    grace: int
    known: bool
    token_expires_in: int
    session_expires_in: int
    used_ago: int | None
    child_is_derived: bool
    child_expires_in: int | None
    child_used: bool
    session_revoked: bool
    generation_revoked: bool
    user_disabled: bool
    audience_issued: bool
    user_bound_covers: bool


FAULTS = (
    "unknown",
    "token_expired",
    "session_expired",
    "used",
    "session_revoked",
    "generation_revoked",
    "user_disabled",
    "audience_gone",
    "user_bound_below",
)
near = st.sampled_from([-3600, -1, 0, 1, 5])


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A fresh token of a live session, with up to three things wrong with it (so that
    each one alone, and a few together, come up often), the times near their edges."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=3))
    used = "used" in faults
    return Case(
        grace=draw(st.sampled_from([0, GRACE])),
        known="unknown" not in faults,
        token_expires_in=draw(near) if "token_expired" in faults else 3600,
        session_expires_in=(
            draw(near) if "session_expired" in faults else draw(st.sampled_from([5, 7200]))
        ),
        used_ago=(
            draw(st.sampled_from([0, 1, GRACE - 1, GRACE, GRACE + 1, 600])) if used else None
        ),
        child_is_derived=draw(st.booleans()) if used else True,
        child_expires_in=draw(st.one_of(st.none(), near, st.just(3600))) if used else None,
        child_used=draw(st.booleans()) if used else False,
        session_revoked="session_revoked" in faults,
        generation_revoked="generation_revoked" in faults,
        user_disabled="user_disabled" in faults,
        audience_issued="audience_gone" not in faults,
        user_bound_covers="user_bound_below" not in faults,
    )


@dataclass(frozen=True)
class Written:
    token: str
    state: RefreshTokenState
    signed_until: datetime


async def _write(
    h: Harness, case: Case, now: datetime, audience: str, user_id: uuid.UUID | None = None
) -> Written:
    """The case's rows, and the state they stand for (as `decide_refresh` reads it). With
    `user_id`, the user's row was written by an earlier case (its user's part the same)."""

    def at(seconds: int) -> datetime:
        return now + timedelta(seconds=seconds)

    new_user = user_id is None
    user_id, session_id = user_id or uuid.uuid4(), uuid.uuid4()
    token = new_refresh_token()
    token_hash = hash_token(token)
    derived = hash_token(derive_child_token(token, h.secret))
    child_hash = derived if case.child_is_derived else secrets.token_bytes(32)
    used_at = None if case.used_ago is None else at(-case.used_ago)
    generation = 1 if case.generation_revoked else 0
    _, access_expires = token_lifetime(now.timestamp(), h.services[GRACE].tokens._policy.access_ttl)
    signed_until = to_datetime(access_expires)
    user_bound = signed_until if case.user_bound_covers else at(-1)
    session_expires_at = at(case.session_expires_in)
    async with h.pool.acquire() as conn:
        if new_user:
            await conn.execute(
                """INSERT INTO users (id, username, username_key, password_hash, scopes, disabled,
                                  created_at, updated_at, session_generation,
                                  access_expires_max)
               VALUES ($1, $2, $2, 'x', '{read,write}', $3, $4, $4, $5, $6)""",
                user_id,
                f"d-{user_id.hex}",
                case.user_disabled,
                at(-7200),
                generation,
                user_bound,
            )
        await conn.execute(
            """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                     access_expires_max, user_generation, revoked_at,
                                     last_refreshed_peer)
               VALUES ($1, $2, '{read}', $3, $4, $5, $4, 0, $6, 'ipv4:192.0.2.7:4000')""",
            session_id,
            user_id,
            audience,
            at(-7200),
            session_expires_at,
            at(-1) if case.session_revoked else None,
        )
        if case.known:
            await conn.execute(
                """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at,
                                               used_at, child_hash)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                token_hash,
                session_id,
                at(-3600),
                at(case.token_expires_in),
                used_at,
                None if used_at is None else child_hash,
            )
        child_row = used_at is not None and case.known and case.child_expires_in is not None
        if child_row:
            assert used_at is not None and case.child_expires_in is not None
            await conn.execute(
                """INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at,
                                               expires_at, used_at, child_hash)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                child_hash,
                session_id,
                token_hash,
                used_at,
                at(case.child_expires_in),
                now if case.child_used else None,
                secrets.token_bytes(32) if case.child_used else None,
            )
    state = RefreshTokenState(
        token_hash=token_hash,
        session_id=session_id,
        user_id=user_id,
        issued_at=at(-3600),
        expires_at=at(case.token_expires_in),
        used_at=used_at,
        child_hash=None if used_at is None else child_hash,
        child_expires_at=(
            at(case.child_expires_in) if child_row and case.child_expires_in is not None else None
        ),
        child_used=child_row and case.child_used,
        session_scopes=("read",),
        session_audience=audience,
        session_expires_at=session_expires_at,
        session_revoked=case.session_revoked or case.generation_revoked,
        user_scopes=("read", "write"),
        user_disabled=case.user_disabled,
        session_generation=0,
        user_access_expires_max=user_bound,
    )
    return Written(token, state, signed_until)


async def _rows(h: Harness, written: Written) -> list[Any]:
    """What a refresh may change: the family's tokens, its session, its user."""
    async with h.pool.acquire() as conn:
        tokens = await conn.fetch(
            "SELECT * FROM refresh_tokens WHERE session_id = $1 ORDER BY token_hash",
            written.state.session_id,
        )
        session = await conn.fetchrow(
            "SELECT * FROM sessions WHERE id = $1", written.state.session_id
        )
        user = await conn.fetchrow("SELECT * FROM users WHERE id = $1", written.state.user_id)
    return [*map(dict, tokens), dict(session or {}), dict(user or {})]


async def _refresh(h: Harness, grace: int, token: str) -> TokenPair | AuthError:
    await asyncio.sleep(0)  # the loggers of the statements sent before run first
    h.queries.clear()
    try:
        return await h.services[grace].tokens.refresh(token, caller=CALLER)
    except AuthError as exc:
        return exc
    finally:
        await asyncio.sleep(0)  # query loggers are called soon after each query


def _expected(h: Harness, case: Case, written: Written, now: datetime) -> RefreshDecision:
    tokens = h.services[case.grace].tokens
    return decide_refresh(
        written.state if case.known else None,
        now=now,
        grace=timedelta(seconds=case.grace),
        idle_ttl=timedelta(seconds=IDLE_TTL),
        child_hash=hash_token(derive_child_token(written.token, h.secret)),
        audiences=tokens.issuable_audiences,
    )


def _audience(h: Harness, case: Case) -> str:
    issued = sorted(h.services[case.grace].tokens.issuable_audiences)[0]
    return issued if case.audience_issued else "retired-audience"


def _check(h: Harness, case: Case) -> None:
    h.clock.advance(7)
    now = to_datetime(h.clock.now())
    written = h.run(_write(h, case, now, _audience(h, case)))
    expected = _expected(h, case, written, now)
    before = h.run(_rows(h, written))
    outcome = h.run(_refresh(h, case.grace, written.token))
    after = h.run(_rows(h, written))
    assert h.queries.count(ROTATE_FRESH_TOKEN_SQL) == 1, h.queries
    if isinstance(expected, Rotate):
        assert LOCK_REFRESH_TOKEN_SQL not in h.queries  # the one statement decided
    _assert_as_decided(
        h, case, written, expected, outcome, before, after, now=now, user_shared=False
    )


def _assert_as_decided(
    h: Harness,
    case: Case,
    written: Written,
    expected: RefreshDecision,
    outcome: TokenPair | AuthError,
    before: list[Any],
    after: list[Any],
    *,
    now: datetime,
    user_shared: bool,
) -> None:
    """`outcome` and the rows after it are what `expected` says. With `user_shared`, a
    refresh of another session of the user may have raised the user's bound."""
    child = derive_child_token(written.token, h.secret)
    match expected:
        case Rotate():
            assert isinstance(outcome, TokenPair), (expected, outcome)
            assert outcome.refresh_token == child
            assert outcome.refresh_token_expires_at == expected.child_expires_at.timestamp()
            rows = {bytes(r["token_hash"]): r for r in after[:-2]}
            parent, stored_child = rows[written.state.token_hash], rows[hash_token(child)]
            assert parent["used_at"] == now and parent["child_hash"] == hash_token(child)
            assert stored_child["expires_at"] == expected.child_expires_at
            assert stored_child["used_at"] is None
            session, user = after[-2], after[-1]
            assert session["last_refreshed_at"] == now
            assert session["last_refreshed_peer"] == CALLER.peer
            assert session["access_expires_max"] >= written.signed_until
            assert session["purge_after"] >= max(written.signed_until, stored_child["expires_at"])
            # Raised (a step past the token) only when the bound read was below it.
            assert user["access_expires_max"] == (
                before[-1]["access_expires_max"]
                if case.user_bound_covers
                else raised_user_bound(written.signed_until)
            )
        case Replay():
            assert isinstance(outcome, TokenPair), (expected, outcome)
            assert outcome.refresh_token == child
            assert written.state.child_expires_at is not None
            assert outcome.refresh_token_expires_at == written.state.child_expires_at.timestamp()
            assert after[:-2] == before[:-2]  # no token written
        case RevokeForReuse():
            assert isinstance(outcome, RefreshTokenReused), (expected, outcome)
            # Revoked now, or before (a session of a revoked generation stays as it is).
            assert after[-2]["revoked_at"] is not None or case.generation_revoked
            assert after[:-2] == before[:-2]
        case Reject():
            assert type(outcome) is expected.error, (expected, outcome)
            # Nothing written (but a bound raised for another session of the user).
            assert after[:-1] == before[:-1]
            assert user_shared or after[-1] == before[-1]


@dataclass(frozen=True)
class Batch:
    """Generated cases refreshed together, in one statement; `users[i]` is the index of
    case i's user (a user's part of the case is that of its first case)."""

    cases: tuple[Case, ...]
    users: tuple[int, ...]


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    """Two to six cases of one grace (one service: one process's batches), some sharing a
    user, each of its own session."""
    grace = draw(st.sampled_from([0, GRACE]))
    drawn = draw(st.lists(cases(), min_size=2, max_size=6))
    users = tuple(draw(st.integers(0, index)) for index in range(len(drawn)))
    shared: list[Case] = []
    for case, user in zip(drawn, users, strict=True):
        first = shared[user] if user < len(shared) else case
        shared.append(
            replace(
                case,
                grace=grace,
                generation_revoked=first.generation_revoked,
                user_disabled=first.user_disabled,
                user_bound_covers=first.user_bound_covers,
            )
        )
    return Batch(tuple(shared), users)


async def _refresh_in_one_batch(
    h: Harness, grace: int, tokens: list[str]
) -> list[TokenPair | AuthError]:
    """Refreshes of `tokens` that wait in the process while a batch in flight is held,
    then go together."""
    service = h.services[grace].tokens

    async def refresh(token: str) -> TokenPair | AuthError:
        try:
            return await service.refresh(token, caller=CALLER)
        except AuthError as exc:
            return exc

    now = to_datetime(h.clock.now())
    async with batch_in_flight_held(h.dsn, service, now=now):
        calls = asyncio.gather(*(refresh(token) for token in tokens))
        for _ in range(3):
            await asyncio.sleep(0)  # each call reaches the store and waits there
        assert not calls.done()
        await asyncio.sleep(0)
        h.logged.clear()
    outcomes = await calls
    await asyncio.sleep(0)  # query loggers are called soon after each query
    return outcomes


def _check_batch(h: Harness, batch: Batch) -> None:
    h.clock.advance(7)
    now = to_datetime(h.clock.now())
    grace = batch.cases[0].grace
    written: list[Written] = []
    for case, user in zip(batch.cases, batch.users, strict=True):
        user_id = written[user].state.user_id if user < len(written) else None
        written.append(h.run(_write(h, case, now, _audience(h, case), user_id)))
    expected = [
        _expected(h, case, one, now) for case, one in zip(batch.cases, written, strict=True)
    ]
    before = [h.run(_rows(h, one)) for one in written]
    outcomes = h.run(_refresh_in_one_batch(h, grace, [one.token for one in written]))
    after = [h.run(_rows(h, one)) for one in written]
    hashes = [one.state.token_hash for one in written]
    sent = [
        [bytes(token_hash) for token_hash in logged.args[0]]
        for logged in h.logged
        if logged.query == ROTATE_FRESH_TOKEN_SQL and set(hashes) & set(map(bytes, logged.args[0]))
    ]
    assert [sorted(tokens) for tokens in sent] == [sorted(hashes)]  # one statement, all of them
    locked = [
        bytes(logged.args[0][0]) for logged in h.logged if logged.query == LOCK_REFRESH_TOKEN_SQL
    ]
    for index, case in enumerate(batch.cases):
        if isinstance(expected[index], Rotate):
            assert written[index].state.token_hash not in locked  # the one statement decided
        user = batch.users[index]
        # Another session of the user refreshed with a token signed: its bound may rise.
        user_shared = any(
            batch.users[other] == user and isinstance(expected[other], Rotate | Replay)
            for other in range(len(batch.cases))
            if other != index
        )
        _assert_as_decided(
            h,
            case,
            written[index],
            expected[index],
            outcomes[index],
            before[index],
            after[index],
            now=now,
            user_shared=user_shared,
        )


@hypothesis_settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_refresh_through_postgresql_decides_as_decide_refresh(harness: Harness, case: Case) -> None:
    _check(harness, case)


@pytest.mark.parametrize(
    "case",
    [
        # The common case, with and without raising the user's bound.
        Case(GRACE, True, 3600, 3600, None, True, None, False, False, False, False, True, True),
        Case(GRACE, True, 3600, 3600, None, True, None, False, False, False, False, True, False),
        # The child expires with the session, not after its idle time.
        Case(GRACE, True, 3600, 5, None, True, None, False, False, False, False, True, True),
        # Within the grace window: the same child; just past it, or a used child: reuse.
        Case(
            GRACE, True, 3600, 3600, GRACE - 1, True, 3600, False, False, False, False, True, True
        ),
        Case(GRACE, True, 3600, 3600, GRACE, True, 3600, False, False, False, False, True, True),
        Case(GRACE, True, 3600, 3600, 1, True, 3600, True, False, False, False, True, True),
        Case(0, True, 3600, 3600, 0, True, 3600, False, False, False, False, True, True),
        # Refusals of an unused token: expired (idle, absolute, at the very instant), revoked,
        # revoked by the user's generation, disabled user, audience no longer issued.
        Case(GRACE, True, 0, 3600, None, True, None, False, False, False, False, True, True),
        Case(GRACE, True, 3600, 0, None, True, None, False, False, False, False, True, True),
        Case(GRACE, True, 3600, 3600, None, True, None, False, True, False, False, True, True),
        Case(GRACE, True, 3600, 3600, None, True, None, False, False, True, False, True, True),
        Case(GRACE, True, 3600, 3600, None, True, None, False, False, False, True, True, True),
        Case(GRACE, True, 3600, 3600, None, True, None, False, False, False, False, False, True),
        Case(GRACE, False, 3600, 3600, None, True, None, False, False, False, False, True, True),
    ],
)
def test_refresh_through_postgresql_decides_as_decide_refresh_in_named_cases(
    harness: Harness, case: Case
) -> None:
    """The cases the generated ones must reach, each named once (so a narrower
    strategy cannot silently leave one out)."""
    _check(harness, case)


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=batches())
def test_refreshes_in_one_statement_each_decide_as_decide_refresh(
    harness: Harness, batch: Batch
) -> None:
    """Independent states (each its own session, some of one user) refreshed together, in
    one statement: each outcome is what `decide_refresh` says for its own state, as if it
    had been alone."""
    _check_batch(harness, batch)
