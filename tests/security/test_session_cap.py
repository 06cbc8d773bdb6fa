"""One account cannot grow its sessions without end: past AUTH_MAX_SESSIONS_PER_USER, each
login revokes the oldest session(s), in the login's own transaction, with the NOTIFY (so
Validate refuses their tokens on every replica) and a security event each. The cost of a
login beside half a million sessions: tests/test_many_sessions.py (slow)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from datetime import timedelta

from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import ManualClock, to_datetime
from service.domain.records import NewSession, SecurityEvent
from tests.helpers import refresh, refresh_fails, validate
from tests.live_server import ServerFactory

REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED


async def test_logins_past_the_session_cap_revoke_the_oldest_so_an_account_cannot_grow_without_end(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    here = await server_factory(max_sessions_per_user=3)
    there = await server_factory(max_sessions_per_user=3)
    user = await here.create_user("max")
    pairs = []
    for _ in range(3):
        pairs.append(await here.login("max"))
        clock.advance(1)
    for _ in range(3):  # each login beyond the cap ends the oldest session left
        evicted = pairs[len(pairs) - 3]
        assert (await validate(there, evicted.access_token)).valid
        pairs.append(await here.login("max"))
        clock.advance(1)
        verdict = await validate(here, evicted.access_token)
        assert (verdict.valid, verdict.error) == (False, REVOKED)
        start = time.monotonic()
        while (await validate(there, evicted.access_token)).valid:
            assert time.monotonic() - start < 1.0, "eviction not seen by the other replica"
            await asyncio.sleep(0.02)
        await refresh_fails(there, evicted.refresh_token, "SESSION_REVOKED")
    for pair in pairs[-3:]:
        assert (await validate(there, pair.access_token)).valid
        await refresh(here, pair.refresh_token)

    admin = admin_pb2_grpc.AdminServiceStub(here.channel)
    listed = await admin.ListSessions(
        admin_pb2.ListSessionsRequest(user=admin_pb2.UserSelector(user_id=str(user.id)))
    )
    assert sorted(s.session_id for s in listed.sessions) == sorted(p.session_id for p in pairs[-3:])
    events = await here.pool.fetch(
        """SELECT subject, session_id, detail FROM security_events
            WHERE kind = 'session_revoked' ORDER BY id"""
    )
    assert [(e["subject"], str(e["session_id"])) for e in events] == [
        (str(user.id), p.session_id) for p in pairs[:3]
    ]
    assert all(json.loads(e["detail"]) == {"reason": "session_limit"} for e in events)
    assert (
        await here.pool.fetchval(
            "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL", user.id
        )
        == 3
    )


async def test_concurrent_logins_of_one_user_stay_within_the_cap(
    server_factory: ServerFactory,
) -> None:
    """Logins of one user take the user's row in turn, so each one counts the others."""
    server = await server_factory(max_sessions_per_user=2)
    user = await server.create_user("mob")
    await asyncio.gather(*(server.login("mob") for _ in range(8)))
    live = await server.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL", user.id
    )
    assert live == 2
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 8


async def test_session_starts_that_queue_on_the_user_row_stay_within_the_cap(
    server_factory: ServerFactory,
) -> None:
    """Logins of one user that all wait for the user's row at once (here: held by another
    transaction until every one of them waits) each count the sessions of those before
    them: the evictions read the sessions after the lock is held, not in a snapshot taken
    before it (where every waiter would see only the sessions from before, and keep all of
    the others' sessions beside its own)."""
    waiters = 6
    server = await server_factory(max_sessions_per_user=2, db_pool_size=waiters + 2)
    user = await server.create_user("queue")
    store = server.running.components.store
    now = to_datetime(server.clock.now())

    def new_session(n: int) -> NewSession:
        return NewSession(
            id=uuid.uuid4(),
            user_id=user.id,
            scopes=("read",),
            audience="a",
            created_at=now + timedelta(seconds=n),
            expires_at=now + timedelta(hours=1),
            first_token_hash=secrets.token_bytes(32),
            first_token_expires_at=now + timedelta(hours=1),
            access_expires_at=now + timedelta(minutes=5),
            peer=None,
            user_agent=None,
        )

    holder = await server.pool.acquire()
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
            starts = [
                asyncio.ensure_future(
                    store.create_session(
                        new_session(n),
                        SecurityEvent(kind="login_succeeded", subject=str(user.id)),
                        verified_hash=user.password_hash,
                        max_sessions=2,
                    )
                )
                for n in range(waiters)
            ]
            deadline = time.monotonic() + 10
            while (
                await server.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
                )
                < waiters
            ):
                assert time.monotonic() < deadline, "the logins did not queue on the user's row"
                await asyncio.sleep(0.01)
    finally:
        await server.pool.release(holder)
    created = await asyncio.gather(*starts)
    assert all(c is not None for c in created)
    live = await server.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL", user.id
    )
    assert live == 2
    evicted = sum(len(c[1]) for c in created if c is not None)
    assert evicted == waiters - 2
    assert (
        await server.pool.fetchval("SELECT count(*) FROM revocation_log WHERE kind = 'session'")
        == waiters - 2
    )
