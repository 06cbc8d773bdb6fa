"""A user with half a million sessions (seeded with SQL): DisableUser, SetPassword,
DeleteUser and Revoke(subject) answer OK within AUTH_DB_TIMEOUT, stop every token of the
user at once on this replica and another, and the per-session bookkeeping catches up in
bounded batches afterwards. Slow (`make test-fast` leaves them out).

Each prints what it measured (`pytest -s`); docs/operations.md ("Large accounts") quotes them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import to_datetime
from service.domain.janitor import CATCH_UP_BATCH
from tests.helpers import assert_error, refresh, refresh_fails, validate
from tests.live_server import PASSWORD, LiveServer, ServerFactory

pytestmark = [pytest.mark.system, pytest.mark.slow]  # half a million rows

SEEDED = 500_000
REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED
NEW_PASSWORD = "a brand new passphrase 42"
PROPAGATION_LIMIT = 1.0  # seconds, as for every revocation (tests/test_replicas.py)


async def seed_sessions(server: LiveServer, user_id: uuid.UUID, count: int) -> float:
    """`count` sessions of the user, one INSERT ... SELECT generate_series on a connection
    of its own (no per-call timeout); the seconds it took."""
    now = to_datetime(server.clock.now())
    assert server.settings.database_url is not None
    conn = await asyncpg.connect(server.settings.database_url)
    try:
        start = time.perf_counter()
        await conn.execute(
            """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                     access_expires_max)
               SELECT gen_random_uuid(), $1, '{}', 'authsvc',
                      $2::timestamptz - make_interval(secs => i / 1000.0), $3, $4
                 FROM generate_series(1, $5) AS i""",
            user_id,
            now - timedelta(seconds=1),
            now + timedelta(days=30),
            now + timedelta(seconds=900),
            count,
        )
        await conn.execute("ANALYZE sessions")
        return time.perf_counter() - start
    finally:
        await conn.close()


async def eventually_revoked(server: LiveServer, token: str) -> float:
    """Seconds until Validate on `server` answers REVOKED (fails past the limit)."""
    start = time.monotonic()
    while True:
        verdict = await validate(server, token)
        if not verdict.valid and verdict.error == REVOKED:
            return time.monotonic() - start
        assert time.monotonic() - start < PROPAGATION_LIMIT, "not revoked on the other replica"
        await asyncio.sleep(0.02)


async def unrevoked_sessions(server: LiveServer, user_id: uuid.UUID) -> int:
    count: int = await server.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL",
        user_id,
        timeout=60,
    )
    return count


Operation = Callable[[LiveServer, uuid.UUID, auth_pb2.TokenPair], Awaitable[int]]


async def disable(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> int:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    response = await admin.DisableUser(
        admin_pb2.DisableUserRequest(user=admin_pb2.UserSelector(user_id=str(user_id)))
    )
    return response.revoked_sessions


async def set_password(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> int:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    response = await admin.SetPassword(
        admin_pb2.SetPasswordRequest(
            user=admin_pb2.UserSelector(user_id=str(user_id)), password=NEW_PASSWORD
        )
    )
    return response.revoked_sessions


async def delete(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> int:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    response = await admin.DeleteUser(
        admin_pb2.DeleteUserRequest(user=admin_pb2.UserSelector(user_id=str(user_id)))
    )
    return response.revoked_sessions


async def logout_everywhere(
    server: LiveServer, user_id: uuid.UUID, pair: auth_pb2.TokenPair
) -> int:
    response = await server.stub.Revoke(
        auth_pb2.RevokeRequest(subject=str(user_id)),
        metadata=(("authorization", f"Bearer {pair.access_token}"),),
    )
    return response.revoked_sessions


# What a login with the old password does afterwards: refused, or a working session.
OPERATIONS: dict[str, tuple[Operation, bool]] = {
    "disable": (disable, False),
    "set_password": (set_password, False),
    "delete": (delete, False),
    "logout_everywhere": (logout_everywhere, True),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_revoking_a_user_with_half_a_million_sessions_is_immediate_everywhere(
    server_factory: ServerFactory, operation: str
) -> None:
    call, can_log_in_again = OPERATIONS[operation]
    here = await server_factory()
    there = await server_factory()
    user = await here.create_user("crowd")
    pairs = [await here.login("crowd") for _ in range(2)]
    seeded_in = await seed_sessions(here, user.id, SEEDED)
    for pair in pairs:
        assert (await validate(there, pair.access_token)).valid

    start = time.perf_counter()
    revoked = await call(here, user.id, pairs[0])
    took = time.perf_counter() - start
    assert took < here.settings.db_timeout
    # Counted up to REVOKED_COUNT_LIMIT (more only for sessions from before the cap).
    assert revoked == 10_000

    # At once on this replica, within the propagation limit on the other.
    for pair in pairs:
        verdict = await validate(here, pair.access_token)
        assert (verdict.valid, verdict.error) == (False, REVOKED)
        await eventually_revoked(there, pair.access_token)
        await refresh_fails(here, pair.refresh_token, "SESSION_REVOKED")
    if can_log_in_again:
        again = await here.login("crowd")
        for server in (here, there):
            assert (await validate(server, again.access_token)).valid
        assert (
            await validate(there, (await refresh(here, again.refresh_token)).access_token)
        ).valid
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await here.login("crowd")
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")

    # The bookkeeping: one bounded batch at a time, until every session is marked.
    store = here.running.components.store
    before = await unrevoked_sessions(here, user.id)
    batch_start = time.perf_counter()
    assert await store.catch_up_user_revocations(batch=CATCH_UP_BATCH, max_batches=1) == (
        CATCH_UP_BATCH
    )
    one_batch = time.perf_counter() - batch_start
    assert await unrevoked_sessions(here, user.id) == before - CATCH_UP_BATCH
    janitor = here.running.components.janitor
    catch_up_start = time.perf_counter()
    while await here.pool.fetchval(
        "SELECT sessions_revoke_pending FROM users WHERE id = $1", user.id
    ):
        await janitor.catch_up_user_revocations()
    caught_up = time.perf_counter() - catch_up_start
    assert await unrevoked_sessions(here, user.id) == (1 if can_log_in_again else 0)
    reasons = await here.pool.fetch(
        "SELECT revoke_reason, count(*) FROM sessions WHERE user_id = $1 GROUP BY 1",
        user.id,
        timeout=60,
    )
    assert {r["revoke_reason"] for r in reasons} <= {
        None,
        "user_disabled",
        "password_changed",
        "user_deleted",
        "logout_everywhere",
    }
    print(
        f"\n{operation}: {SEEDED} sessions seeded in {seeded_in:.1f}s; the call took "
        f"{took:.3f}s; one catch-up batch of {CATCH_UP_BATCH}: {one_batch:.3f}s; "
        f"the rest: {caught_up:.1f}s"
    )


@pytest.mark.timeout(600)
async def test_the_session_cap_stays_cheap_for_a_user_far_beyond_it(
    server_factory: ServerFactory,
) -> None:
    """A user with half a million sessions from before the cap: each login reads a bounded
    part of them, revokes a bounded number of the oldest, and answers as usual."""
    server = await server_factory(access_ttl=3600)
    user = await server.create_user("hoarder")
    oldest = await server.login("hoarder")
    server.clock.advance(1000)  # the seeded sessions are all younger
    await seed_sessions(server, user.id, SEEDED)
    start = time.perf_counter()
    pair = await server.login("hoarder", password=PASSWORD)
    took = time.perf_counter() - start
    assert took < server.settings.db_timeout
    assert (await validate(server, pair.access_token)).valid
    # The oldest went first: the real login made before the seeded ones (older still).
    verdict = await validate(server, oldest.access_token)
    assert (verdict.valid, verdict.error) == (False, REVOKED)
    evicted = await server.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoke_reason = 'session_limit'",
        user.id,
    )
    assert evicted == 100  # MAX_EVICTIONS_PER_LOGIN
    # The admin view of those sessions answers too (seeded sessions have no refresh token:
    # none of them is live, so the page is the two real ones).
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    start = time.perf_counter()
    listed = await admin.ListSessions(
        admin_pb2.ListSessionsRequest(user=admin_pb2.UserSelector(user_id=str(user.id)))
    )
    listed_in = time.perf_counter() - start
    assert [s.session_id for s in listed.sessions] == [pair.session_id]
    print(
        f"\nlogin beside {SEEDED} sessions: {took:.3f}s, {evicted} oldest evicted; "
        f"ListSessions: {listed_in:.3f}s"
    )
