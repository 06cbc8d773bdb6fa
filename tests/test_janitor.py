"""The janitor: the database returns to its floor after tokens expire, and nothing still
needed (a live session, a revocation whose tokens may be alive, reuse evidence) is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import replace

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import to_datetime
from service.database import create_pool
from service.domain.janitor import Janitor
from service.domain.revocation import REVOCATION_MARGIN_SECONDS
from service.metrics import PrometheusTelemetry
from service.settings import MAX_LEEWAY
from service.store.invariants import family_invariant_violations
from service.store.postgres import PostgresStore
from service.store.revocations import PURGE_AFTER_STEP_SECONDS
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


def _janitor_with_metrics(
    server: LiveServer, **overrides: object
) -> tuple[Janitor, PrometheusTelemetry]:
    """A janitor over the server's store and keys, counting into a registry of its own."""
    telemetry = PrometheusTelemetry()
    components = server.running.components
    janitor = Janitor(
        settings=replace(server.settings, **overrides),  # type: ignore[arg-type]
        store=components.store,
        keys=components.signing_keys,
        clock=server.clock,
        telemetry=telemetry,
    )
    return janitor, telemetry


def _failures(telemetry: PrometheusTelemetry, table: str) -> float:
    value = telemetry.registry.get_sample_value("authsvc_janitor_failures_total", {"table": table})
    return value or 0.0


async def test_a_rotation_within_the_step_leaves_the_indexed_purge_time_as_it_is(
    server_factory: ServerFactory,
) -> None:
    """A refresh moves its session's purge time (the new refresh token expires later), but
    `purge_after` is indexed: written on every refresh, no refresh could be a HOT update.
    It moves in steps instead: refreshes within one leave it as it is, and it stays within
    a step of what the rows give."""
    # Long lifetimes, so that the step (not the session's absolute expiry) bounds it.
    server = await server_factory(
        access_ttl=60, refresh_idle_ttl=86400, refresh_absolute_ttl=864000
    )
    await server.create_user("stepper")
    pair = await server.login("stepper")

    async def stored() -> object:
        return await server.pool.fetchval(
            "SELECT purge_after FROM sessions WHERE id = $1", uuid.UUID(pair.session_id)
        )

    async def within_a_step() -> None:
        async with server.pool.acquire() as conn:
            problems = await family_invariant_violations(conn, now=to_datetime(server.clock.now()))
        assert not problems, "\n".join(problems)

    server.clock.advance(10)
    pair = await refresh(server, pair.refresh_token)  # moves it a step past exact
    first = await stored()
    await within_a_step()
    for _ in range(3):
        server.clock.advance(60)
        pair = await refresh(server, pair.refresh_token)
        assert await stored() == first
        await within_a_step()
    server.clock.advance(PURGE_AFTER_STEP_SECONDS)  # past the step: moved again
    pair = await refresh(server, pair.refresh_token)
    assert await stored() != first
    await within_a_step()


async def test_a_table_that_cannot_be_cleaned_does_not_stop_the_others(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Another session holds the sessions table locked: that step gives up within a second
    (logged, counted), and old events and throttle counts are deleted all the same; the
    next pass, lock gone, deletes the dead sessions."""
    server = await server_factory(event_retention=3600, throttle_window=600, **TTL)
    janitor, telemetry = _janitor_with_metrics(server)
    await server.create_user("blocked")
    await server.login("blocked")  # a session that will be dead
    with pytest.raises(grpc.aio.AioRpcError):
        await server.login("blocked", password="wrong password")
    server.clock.advance(3600 + 1)  # past everything's keep time
    assert server.settings.database_url is not None
    locker = await asyncpg.connect(server.settings.database_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            with caplog.at_level(logging.DEBUG, logger="service.domain.janitor"):
                deleted = await asyncio.wait_for(janitor.run_once(), timeout=30)
        assert deleted is not None
        assert await server.pool.fetchval("SELECT count(*) FROM login_throttle") == 0
        assert await server.pool.fetchval("SELECT count(*) FROM security_events") == 0
        assert deleted["security_events"] >= 2 and deleted["login_throttle"] == 2
        assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 1
        assert _failures(telemetry, "sessions") == 1
        failed = [r for r in caplog.records if "janitor: sessions failed" in r.getMessage()]
        assert failed and failed[0].levelno == logging.WARNING
        assert any(r.exc_info for r in caplog.records if "sessions failure" in r.getMessage())
        deleted = await asyncio.wait_for(janitor.run_once(), timeout=30)
        assert deleted is not None and deleted["sessions"] == 1
        assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0
        assert _failures(telemetry, "sessions") == 1
    finally:
        await locker.close()


async def test_a_failed_pass_is_logged_and_counted_not_swallowed(
    server: LiveServer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """run_forever over a database it cannot reach: each failed pass is a warning line
    and a count, and the loop goes on."""
    pool = await create_pool(database_url, server.settings)
    await pool.close()
    telemetry = PrometheusTelemetry()
    components = server.running.components
    janitor = Janitor(
        settings=replace(server.settings, janitor_interval=0.05),
        store=PostgresStore(pool, timeout=1.0),
        keys=components.signing_keys,
        clock=server.clock,
        telemetry=telemetry,
    )
    task = asyncio.create_task(janitor.run_forever())
    try:
        with caplog.at_level(logging.INFO, logger="service.domain.janitor"):
            for _ in range(100):
                await asyncio.sleep(0.05)
                if _failures(telemetry, "pass") >= 2:
                    break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert _failures(telemetry, "pass") >= 2, "the loop goes on after a failed pass"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("janitor: pass failed" in line and "DatabaseUnavailable" in line for line in lines)


async def test_every_session_write_keeps_its_purge_time_within_a_step(
    server_factory: ServerFactory,
) -> None:
    """Every statement that changes what decides when a session may go (login, rotation,
    a replay within the grace window, logout, reuse detection, an operator's revocation,
    a password change, a deletion, the session cap's evictions) leaves `purge_after` at
    what the rows give, or later by at most PURGE_AFTER_STEP_SECONDS, never earlier: the
    janitor's index finds each session once it may be deleted, a step late at most."""
    # Within the cap for "writer" (five logins); "crowded" goes past it.
    server = await server_factory(**TTL, max_sessions_per_user=5)
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    for name in ("writer", "changed", "deleted", "crowded"):
        await server.create_user(name)

    async def exact() -> None:
        async with server.pool.acquire() as conn:
            problems = await family_invariant_violations(conn, now=to_datetime(server.clock.now()))
        assert not problems, "\n".join(problems)
        unset = await server.pool.fetchval(
            "SELECT count(*) FROM sessions WHERE purge_after IS NULL"
        )
        assert unset == 0

    rotated = await server.login("writer")
    await exact()
    server.clock.advance(30)
    child = await refresh(server, rotated.refresh_token)  # rotation
    server.clock.advance(1)
    await refresh(server, rotated.refresh_token)  # a replay within the grace window
    await exact()
    logged_out = await server.login("writer")
    await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=logged_out.refresh_token))
    await exact()
    server.clock.advance(60)
    await refresh_fails(server, rotated.refresh_token, "REFRESH_TOKEN_REUSED")  # reuse
    await exact()
    by_admin = await server.login("writer")
    await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=by_admin.session_id))
    await server.login("changed")
    await admin.SetPassword(
        admin_pb2.SetPasswordRequest(
            user=admin_pb2.UserSelector(username="changed"), password="another passphrase"
        )
    )
    await server.login("deleted")
    await admin.DeleteUser(
        admin_pb2.DeleteUserRequest(user=admin_pb2.UserSelector(username="deleted"))
    )
    await exact()
    assert child.session_id == rotated.session_id
    # Near the end of its absolute lifetime the access tokens outlive the session: a
    # replay's token then moves its purge time.
    ending = await server.login("writer")
    for _ in range(2):  # refreshed now and then, so its token stays alive
        server.clock.advance(295)
        ending = await refresh(server, ending.refresh_token)
    last = await refresh(server, ending.refresh_token)
    server.clock.advance(1)
    await refresh(server, ending.refresh_token)  # a replay within the grace window
    await exact()
    assert last.session_id == ending.session_id
    # A session that died long ago, revoked now: it may go when it died, not later.
    idle = await server.login("writer")
    server.clock.advance(300 + 1)  # its refresh token expired
    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=idle.access_token))
    await exact()
    # The session cap's evictions (the first session evicted after its token expired).
    for _ in range(7):
        await server.login("crowded")
        server.clock.advance(100)
    evicted = await server.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE revoke_reason = 'session_limit'"
    )
    assert evicted == 2
    await exact()
