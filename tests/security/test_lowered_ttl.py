"""A revocation is remembered until the latest `exp` of any access token its session was
issued (stored with the session), whatever AUTH_ACCESS_TTL and AUTH_LEEWAY say later.

Each test issues tokens under one configuration, then starts another server on the same
database with a shorter access TTL (or a longer leeway), as a redeployment would (the new
values adopted as the shared ones first, as `authsvc settings adopt` does), and moves the
clock past what the new settings alone would keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace
from typing import Any

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.clock import ManualClock, to_datetime
from service.domain.shared_settings import adopt_shared_settings
from service.settings import MAX_LEEWAY, Settings
from tests.helpers import assert_error, refresh, validate
from tests.live_server import LiveServer, ServerFactory

REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED
EXPIRED = auth_pb2.VALIDATION_ERROR_EXPIRED
# The old rule kept a revocation for the *current* access TTL + leeway + 60 s.
OLD_MARGIN = 60


async def _revoke(server: LiveServer, **target: str) -> int:
    response = await server.stub.Revoke(auth_pb2.RevokeRequest(**target))
    return response.revoked_sessions


async def _redeployed(
    server_factory: ServerFactory, settings: Settings, before: LiveServer, **overrides: Any
) -> LiveServer:
    """A server with other lifetimes on the same database, once they are adopted as the
    shared settings (replicas refuse to start with values the others do not share)."""
    await adopt_shared_settings(
        before.running.components.store,
        replace(settings, **overrides),
        clock=before.clock,
        actor="test",
    )
    return await server_factory(**overrides)


async def _stored_bound(server: LiveServer, session_id: str) -> float | None:
    value = await server.pool.fetchval(
        "SELECT extract(epoch FROM access_expires_max)::float8 FROM sessions WHERE id = $1",
        uuid.UUID(session_id),
    )
    return None if value is None else float(value)


async def test_a_revocation_outlives_a_lowered_access_ttl_and_leeway(
    server_factory: ServerFactory, clock: ManualClock, settings: Settings
) -> None:
    before = await server_factory(access_ttl=900, leeway=30, refresh_idle_ttl=100)
    await before.create_user("lowered")
    revoked = await before.login("lowered")
    assert await _revoke(before, refresh_token=revoked.refresh_token) == 1
    assert (await validate(before, revoked.access_token)).error == REVOKED

    # Redeployed with a 60 s access TTL and no leeway; the old rule forgot after 120 s.
    clock.advance(60 + OLD_MARGIN + 1)
    after = await _redeployed(
        server_factory, settings, before, access_ttl=60, leeway=0, refresh_idle_ttl=100
    )
    await after.running.components.janitor.run_once()
    result = await validate(after, revoked.access_token)
    assert not result.valid
    assert result.error == REVOKED
    assert await _stored_bound(after, revoked.session_id) == revoked.access_token_expires_at.seconds

    # Still refused, on every server, until the token itself has expired ...
    clock.advance(revoked.access_token_expires_at.seconds - clock.now() - 1)
    await after.running.components.janitor.run_once()
    for server in (before, after):
        assert (await validate(server, revoked.access_token)).error == REVOKED
    # ... and the session is deleted once no leeway up to the limit accepts the token.
    clock.advance(1 + MAX_LEEWAY + OLD_MARGIN + 1)
    deleted = await after.running.components.janitor.run_once()
    assert deleted is not None and deleted["sessions"] == 1
    assert await _stored_bound(after, revoked.session_id) is None


async def test_a_session_stays_revocable_after_the_access_ttl_is_lowered(
    server_factory: ServerFactory, clock: ManualClock, settings: Settings
) -> None:
    before = await server_factory(access_ttl=900, refresh_idle_ttl=100)
    await before.create_user("idle")
    pair = await before.login("idle")

    # Its refresh token expired long ago (the session is dead), its access token lives on.
    clock.advance(100 + 60 + OLD_MARGIN + 1)
    after = await _redeployed(server_factory, settings, before, access_ttl=60, refresh_idle_ttl=100)
    await after.running.components.janitor.run_once()
    assert (await validate(after, pair.access_token)).valid
    assert await _revoke(after, access_token=pair.access_token) == 1
    assert (await validate(after, pair.access_token)).error == REVOKED


async def test_a_revocation_outlives_a_raised_leeway(
    server_factory: ServerFactory, clock: ManualClock, settings: Settings
) -> None:
    before = await server_factory(access_ttl=900, leeway=0)
    await before.create_user("raised")
    pair = await before.login("raised")
    assert await _revoke(before, access_token=pair.access_token) == 1

    # Past exp + leeway 0 + 60 s: the old janitor deleted the session here.
    clock.advance(900 + OLD_MARGIN + 1)
    await before.running.components.janitor.run_once()
    # A replica started with the largest leeway allowed still accepts the token's time ...
    wide = await _redeployed(server_factory, settings, before, access_ttl=900, leeway=MAX_LEEWAY)
    await wide.running.components.janitor.run_once()
    # ... but knows it is revoked.
    assert (await validate(wide, pair.access_token)).error == REVOKED


async def test_the_bound_is_the_latest_exp_of_any_token_the_session_was_issued(
    server_factory: ServerFactory, clock: ManualClock, settings: Settings
) -> None:
    before = await server_factory(access_ttl=900, refresh_reuse_grace=10)
    await before.create_user("rotating")
    first = await before.login("rotating")
    assert await _stored_bound(before, first.session_id) == first.access_token_expires_at.seconds

    clock.advance(600)
    rotated = await refresh(before, first.refresh_token)
    assert rotated.access_token_expires_at.seconds == first.access_token_expires_at.seconds + 600
    assert await _stored_bound(before, first.session_id) == rotated.access_token_expires_at.seconds
    # A replay within the grace window signs another access token: the bound follows it.
    clock.advance(5)
    replayed = await refresh(before, first.refresh_token)
    assert replayed.refresh_token == rotated.refresh_token
    assert replayed.access_token_expires_at.seconds == rotated.access_token_expires_at.seconds + 5
    assert await _stored_bound(before, first.session_id) == replayed.access_token_expires_at.seconds
    assert await _revoke(before, refresh_token=rotated.refresh_token) == 1

    # Past what the first token needed, with the TTL lowered: the later tokens stay refused.
    clock.advance(900 - 605 + MAX_LEEWAY + OLD_MARGIN + 1)
    after = await _redeployed(server_factory, settings, before, access_ttl=60)
    await after.running.components.janitor.run_once()
    assert (await validate(after, first.access_token)).error == EXPIRED
    for token in (rotated.access_token, replayed.access_token):
        assert (await validate(after, token)).error == REVOKED


async def _wait_until_blocked(watcher: asyncpg.Connection, task: asyncio.Task[object]) -> None:
    """Until a server backend waits for a lock while touching refresh tokens."""
    deadline = time.monotonic() + 10
    while not await watcher.fetchval(
        """SELECT count(*) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND wait_event_type = 'Lock' AND query LIKE '%refresh_tokens%'"""
    ):
        assert not task.done(), "the Refresh finished without waiting for the session row"
        assert time.monotonic() < deadline, "the Refresh never waited for the session row"
        await asyncio.sleep(0.02)


async def test_a_refresh_racing_a_revocation_yields_no_token(
    server: LiveServer, database_url: str, clock: ManualClock
) -> None:
    """A revocation that commits while a Refresh of its session waits for the session row
    wins: the Refresh signs nothing (the revocation's notification carried the session's
    bound as it was; a token signed after it would outlive what replicas remember)."""
    await server.create_user("racer")
    pair = await server.login("racer")
    revoker = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    task: asyncio.Task[object] | None = None
    try:
        revocation = revoker.transaction()
        await revocation.start()
        await revoker.execute(
            "UPDATE sessions SET revoked_at = $2, revoke_reason = 'race' WHERE id = $1",
            uuid.UUID(pair.session_id),
            to_datetime(clock.now()),
        )
        task = asyncio.create_task(refresh(server, pair.refresh_token))
        await _wait_until_blocked(watcher, task)
        await revocation.commit()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(task, timeout=10)
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await revoker.close()
        await watcher.close()
    # Nothing of the refused rotation was written: the token is not even marked used.
    used = await server.pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE session_id = $1 AND used_at IS NOT NULL",
        uuid.UUID(pair.session_id),
    )
    assert used == 0
