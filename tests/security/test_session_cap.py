"""One account cannot grow its sessions without end: past AUTH_MAX_SESSIONS_PER_USER, each
login revokes the oldest session(s), in the login's own transaction, with the NOTIFY (so
Validate refuses their tokens on every replica) and a security event each. The cost of a
login beside half a million sessions: tests/test_many_sessions.py (slow)."""

from __future__ import annotations

import asyncio
import json
import time

from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import ManualClock
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
