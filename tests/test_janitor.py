"""The janitor: the database returns to its floor after tokens expire, and nothing still
needed (a live session, a revocation whose tokens may be alive, reuse evidence) is lost."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from service.domain.revocation import REVOCATION_MARGIN_SECONDS
from service.gen.auth.v1 import auth_pb2
from service.settings import MAX_LEEWAY
from tests.helpers import refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory

TTL = {"access_ttl": 60, "refresh_idle_ttl": 300, "refresh_absolute_ttl": 600}
# The tests' access tokens are all signed at their start: the sessions' stored bound is
# start + 60, and is kept past that by the largest leeway allowed and the margin.
KEEP = 60 + MAX_LEEWAY + int(REVOCATION_MARGIN_SECONDS)


async def _counts(pool: asyncpg.Pool) -> tuple[int, int]:
    sessions = await pool.fetchval("SELECT count(*) FROM sessions")
    tokens = await pool.fetchval("SELECT count(*) FROM refresh_tokens")
    return int(sessions), int(tokens)


async def test_rows_return_to_their_floor_after_tokens_expire(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(**TTL)
    janitor = server.running.components.janitor
    await server.create_user("steady")
    for _cycle in range(3):
        # Steady load: logins, rotations, a logout.
        pairs = [await server.login("steady") for _ in range(4)]
        for pair in pairs:
            await refresh(server, (await refresh(server, pair.refresh_token)).refresh_token)
        await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=pairs[0].refresh_token))
        assert await _counts(server.pool) == (4, 12)
        # Nothing is deleted while it may still matter.
        await janitor.run_once()
        assert await _counts(server.pool) == (4, 12)
        # Every session past its absolute lifetime, and its access tokens dead too.
        server.clock.advance(600 + KEEP + 1)
        deleted = await janitor.run_once()
        assert deleted is not None
        assert deleted["sessions"] == 4
        assert await _counts(server.pool) == (0, 0), "back to the floor"


async def test_live_and_recently_revoked_sessions_are_kept(server_factory: ServerFactory) -> None:
    server = await server_factory(**TTL)
    janitor = server.running.components.janitor
    await server.create_user("keeper")
    live = await server.login("keeper")
    child = await refresh(server, live.refresh_token)
    revoked = await server.login("keeper")
    await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=revoked.refresh_token))

    server.clock.advance(KEEP - 1)
    await janitor.run_once()
    # The revoked session is still known (its access token could be alive) ...
    assert (await validate(server, revoked.access_token)).error in (
        auth_pb2.VALIDATION_ERROR_REVOKED,
        auth_pb2.VALIDATION_ERROR_EXPIRED,
    )
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 2
    # ... and the live one keeps its used token: reuse of it is still detected.
    await refresh_fails(server, live.refresh_token, "REFRESH_TOKEN_REUSED")

    server.clock.advance(2)
    await janitor.run_once()
    # The logged-out session is gone; the one just revoked by the reuse stays its keep time.
    remaining = await server.pool.fetch("SELECT id FROM sessions")
    assert [str(r["id"]) for r in remaining] == [live.session_id]
    assert child.session_id == live.session_id
    server.clock.advance(KEEP)
    await janitor.run_once()
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_idle_sessions_go_once_their_last_token_expired(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(**TTL)
    janitor = server.running.components.janitor
    await server.create_user("idler")
    idle = await server.login("idler")
    server.clock.advance(300 + KEEP + 1)  # idle expiry of its only token, plus the keep time
    busy = await server.login("idler")
    await janitor.run_once()
    remaining = {str(r["id"]) for r in await server.pool.fetch("SELECT id FROM sessions")}
    assert remaining == {busy.session_id}
    assert idle.session_id not in remaining


async def test_old_events_and_throttle_counts_are_deleted(server_factory: ServerFactory) -> None:
    server = await server_factory(event_retention=3600, throttle_window=600, **TTL)
    janitor = server.running.components.janitor
    await server.create_user("forgetful")
    with pytest.raises(grpc.aio.AioRpcError):
        await server.login("forgetful", password="wrong password")
    assert await server.pool.fetchval("SELECT count(*) FROM login_throttle") == 2
    events_before = await server.pool.fetchval("SELECT count(*) FROM security_events")
    assert events_before >= 2
    server.clock.advance(3601)
    await server.login("forgetful")  # a fresh event, to be kept
    await janitor.run_once()
    assert await server.pool.fetchval("SELECT count(*) FROM login_throttle") == 0
    kinds = [r["kind"] for r in await server.pool.fetch("SELECT kind FROM security_events")]
    assert kinds == ["login_succeeded"]


async def test_one_replica_at_a_time(server: LiveServer, database_url: str) -> None:
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", 0x6A616E69)
        assert await server.running.components.janitor.run_once() is None
        await other.execute("SELECT pg_advisory_unlock($1)", 0x6A616E69)
        assert await server.running.components.janitor.run_once() is not None
    finally:
        await other.close()
