"""WatchRevocations (issue 10): a snapshot to start, exactly what was missed on resume, a
snapshot when the cursor was compacted, every kind of revocation and key change pushed
from another server on the same database, heartbeats. Real servers, real PostgreSQL,
generated stubs. The attack-style ones (slow consumers, caller auth, the stream budget,
bad requests) are in tests/security/test_revocation_watch.py."""

from __future__ import annotations

import json

import grpc
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import ManualClock
from tests.helpers import assert_error
from tests.live_server import LiveServer, ServerFactory
from tests.watching import Watch

LIVENESS = 2.0
"""Seconds within which a revocation made on one server reaches a watcher of another."""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def log_head(server: LiveServer) -> int:
    head: int = await server.pool.fetchval("SELECT sequence FROM revocation_log_head")
    return head


async def test_a_watcher_from_0_gets_a_snapshot_of_every_remembered_revocation_and_the_jwks(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory()
    await first.create_user("ada")
    user = await first.create_user("bob")
    revoked = await first.login("ada")
    kept = await first.login("ada")
    await first.stub.Revoke(auth_pb2.RevokeRequest(access_token=revoked.access_token))
    bobs = await first.login("bob")
    await first.stub.Revoke(
        auth_pb2.RevokeRequest(subject=str(user.id)), metadata=bearer(bobs.access_token)
    )
    # A server started afterwards knows them from the log alone.
    second = await server_factory()
    watch = Watch.open(second.channel)
    await watch.until(lambda w: w.sequence > 0, what="the snapshot")
    update = watch.updates[0]
    assert update.snapshot
    assert update.sequence == await log_head(first)
    assert update.HasField("sent_at")
    assert {r.session_id for r in update.revoked} == {revoked.session_id}
    assert kept.session_id not in watch.sessions
    assert [(u.subject, u.generation) for u in update.revoked_users] == [(str(user.id), 1)]
    jwks = await second.stub.GetJwks(auth_pb2.GetJwksRequest())
    assert update.jwks_json == jwks.jwks_json
    assert json.loads(update.jwks_json)["keys"]
    # keep_until: the session's last access token's exp plus the largest leeway and margin.
    assert update.revoked[0].keep_until.seconds > first.clock.now()
    await watch.close()


async def test_a_resumed_watcher_gets_exactly_the_entries_it_missed(server: LiveServer) -> None:
    await server.create_user("cy")
    pairs = [await server.login("cy") for _ in range(4)]
    watch = Watch.open(server.channel)
    await watch.until(lambda w: w.sequence > 0, what="the snapshot")
    position = watch.sequence
    await watch.close()
    for pair in pairs[:3]:
        await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=pair.access_token))
    assert await log_head(server) == position + 3

    resumed = Watch.open(server.channel, after_sequence=position)
    await resumed.until(lambda w: w.sequence == position + 3, what="the missed entries")
    first = resumed.updates[0]
    assert not first.snapshot
    assert first.jwks_json  # the first update always carries the key set
    got = [r.session_id for u in resumed.updates for r in u.revoked]
    assert got == [p.session_id for p in pairs[:3]]  # in log order, each once

    # Resuming from where it is now: nothing to send but the position.
    current = Watch.open(server.channel, after_sequence=position + 3)
    await current.until(lambda w: w.sequence == position + 3, what="the position")
    assert not current.updates[0].snapshot and not current.updates[0].revoked
    await resumed.close()
    await current.close()


async def test_a_watcher_whose_cursor_was_compacted_gets_a_snapshot(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(revocation_poll_interval=0.2)
    await server.create_user("dee")
    early = await server.login("dee")
    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=early.access_token))
    position = await log_head(server)
    late = await server.login("dee")
    await server.stub.Revoke(auth_pb2.RevokeRequest(access_token=late.access_token))
    # Both revocations' tokens are long expired: the janitor compacts the log.
    clock.advance(3 * 3600)
    done = await server.running.components.janitor.run_once()
    assert done is not None and done["revocation_log"] >= 2
    horizon = await server.pool.fetchval("SELECT compacted_through FROM revocation_log_horizon")
    assert horizon >= position + 1
    # The server's state forgets them too (its poll prunes), raising its own horizon.
    state = server.running.components.revocations
    watch_probe = Watch.open(server.channel)
    await watch_probe.until(lambda _w: state.horizon >= position + 1, what="prune")
    await watch_probe.close()

    resumed = Watch.open(server.channel, after_sequence=position)
    await resumed.until(lambda w: w.sequence > 0, what="a snapshot")
    assert resumed.updates[0].snapshot
    assert early.session_id not in resumed.sessions  # forgotten: its tokens are dead
    await resumed.close()


async def test_every_kind_of_revocation_reaches_a_watcher_of_another_server(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory(refresh_reuse_grace=0)
    second = await server_factory(refresh_reuse_grace=0)  # a shared setting
    admin = admin_pb2_grpc.AdminServiceStub(first.channel)
    watch = Watch.open(second.channel)
    await watch.until(lambda w: w.sequence > 0, what="the snapshot")

    async def session_reaches(session_id: str, what: str) -> None:
        await watch.until(lambda w: session_id in w.sessions, within=LIVENESS, what=what)

    async def user_reaches(user_id: str, generation: int, what: str) -> None:
        await watch.until(
            lambda w: w.users.get(user_id, 0) >= generation, within=LIVENESS, what=what
        )

    user = await first.create_user("eve")
    by_token = await first.login("eve")
    await first.stub.Revoke(auth_pb2.RevokeRequest(access_token=by_token.access_token))
    await session_reaches(by_token.session_id, "Revoke by access token")

    by_refresh = await first.login("eve")
    await first.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=by_refresh.refresh_token))
    await session_reaches(by_refresh.session_id, "Revoke by refresh token")

    by_session = await first.login("eve")
    await first.stub.Revoke(
        auth_pb2.RevokeRequest(session_id=by_session.session_id),
        metadata=bearer(by_session.access_token),
    )
    await session_reaches(by_session.session_id, "Revoke by session id")

    reused = await first.login("eve")
    await first.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=reused.refresh_token))
    try:
        await first.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=reused.refresh_token))
        raise AssertionError("reuse was not detected")
    except grpc.aio.AioRpcError as error:
        assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    await session_reaches(reused.session_id, "reuse detection")

    by_admin = await first.login("eve")
    await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=by_admin.session_id))
    await session_reaches(by_admin.session_id, "admin RevokeSession")

    everywhere = await first.login("eve")
    await first.stub.Revoke(
        auth_pb2.RevokeRequest(subject=str(user.id)), metadata=bearer(everywhere.access_token)
    )
    await user_reaches(str(user.id), 1, "Revoke by subject")

    selector = admin_pb2.UserSelector(user_id=str(user.id))
    await admin.SetPassword(admin_pb2.SetPasswordRequest(user=selector, password="new pw 1234"))
    await user_reaches(str(user.id), 2, "SetPassword")

    await admin.DisableUser(admin_pb2.DisableUserRequest(user=selector))
    await user_reaches(str(user.id), 3, "DisableUser")
    # One entry per user-wide revocation, never one per session.
    assert len(watch.users) == 1
    assert watch.sequence == await log_head(first)
    await watch.close()


async def test_a_session_cap_eviction_reaches_a_watcher(server_factory: ServerFactory) -> None:
    first = await server_factory(max_sessions_per_user=1)
    second = await server_factory(max_sessions_per_user=1)
    watch = Watch.open(second.channel)
    await watch.until(lambda w: w.sequence > 0, what="the snapshot")
    await first.create_user("fay")
    oldest = await first.login("fay")
    await first.login("fay")
    await watch.until(lambda w: oldest.session_id in w.sessions, within=LIVENESS, what="evicted")
    await watch.close()


async def test_a_key_rotation_sends_the_new_jwks_to_watchers_of_another_server(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory()
    second = await server_factory()
    watch = Watch.open(second.channel)
    await watch.until(lambda w: w.sequence > 0, what="the snapshot")
    before = {k["kid"] for k in json.loads(watch.jwks_json)["keys"]}
    admin = admin_pb2_grpc.AdminServiceStub(first.channel)
    rotated = await admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest())
    new_kid = rotated.key.kid
    assert new_kid not in before
    await watch.until(
        lambda w: new_kid in {k["kid"] for k in json.loads(w.jwks_json)["keys"]},
        within=LIVENESS,
        what="the new key",
    )
    carrying = [u for u in watch.updates[1:] if u.jwks_json]
    assert (
        carrying
        and carrying[0].jwks_json
        == (await second.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json
    )
    await watch.close()


async def test_heartbeats_come_at_least_every_watch_heartbeat(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(watch_heartbeat=0.1)
    watch = Watch.open(server.channel)
    await watch.until(lambda w: len(w.updates) >= 11, within=5.0, what="ten heartbeats")
    heartbeats = watch.updates[1:]
    for beat in heartbeats:
        assert beat.HasField("sent_at")
        assert (beat.sequence, beat.snapshot, len(beat.revoked), beat.jwks_json) == (
            0,
            False,
            0,
            "",
        )
    gaps = [b - a for a, b in zip(watch.arrived, watch.arrived[1:], strict=False)]
    # A liveness bound (the loop may be late, never silent): well under a second each.
    assert max(gaps) < 1.0
    await watch.close()
