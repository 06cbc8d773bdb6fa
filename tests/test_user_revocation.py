"""Revoking every session of a user at once (issue 14, item 2): one row, the user's session
generation, which Refresh reads in its lock query and Validate (no database) through the
tokens' `ugen` claim and a per-user entry every replica remembers (NOTIFY, poll, start-up
load) until the user's bound has passed. The same-second case, a login right after a
logout everywhere, the bound's steps, the admin views before the janitor's catch-up.
The large-table versions are in tests/test_many_sessions.py (slow)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.clock import ManualClock, to_datetime
from service.domain.revocation import (
    REVOCATION_MARGIN_SECONDS,
    USER_BOUND_STEP_SECONDS,
    RevocationState,
    UserRevocation,
)
from service.settings import MAX_LEEWAY, Settings, SettingsError
from tests.helpers import refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory

REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED
PROPAGATION_LIMIT = 1.0


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def logout_everywhere(server: LiveServer, subject: str, token: str) -> int:
    response = await server.stub.Revoke(
        auth_pb2.RevokeRequest(subject=subject), metadata=bearer(token)
    )
    return response.revoked_sessions


async def assert_revoked(server: LiveServer, token: str) -> None:
    verdict = await validate(server, token)
    assert (verdict.valid, verdict.error) == (False, REVOKED)


async def eventually_revoked(server: LiveServer, token: str) -> None:
    start = time.monotonic()
    while True:
        verdict = await validate(server, token)
        if (verdict.valid, verdict.error) == (False, REVOKED):
            return
        assert time.monotonic() - start < PROPAGATION_LIMIT, "not revoked on the other replica"
        await asyncio.sleep(0.02)


async def test_a_login_in_the_same_second_as_a_logout_everywhere_is_valid_and_older_ones_are_not(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    """The clock stands still: every login and the logout share one instant (and one `iat`).
    Which tokens the logout ends is decided by the session's generation, not by time, so
    the logins before it are refused and the one after it is valid, on every replica."""
    here, there = await server_factory(), await server_factory()
    user = await here.create_user("sam")
    before = [await here.login("sam") for _ in range(2)]
    assert await logout_everywhere(here, str(user.id), before[0].access_token) == 2
    after = await here.login("sam")

    for pair in before:
        await assert_revoked(here, pair.access_token)
        await eventually_revoked(there, pair.access_token)
        await refresh_fails(there, pair.refresh_token, "SESSION_REVOKED")
    for server in (here, there):
        assert (await validate(server, after.access_token)).valid
    refreshed = await refresh(there, after.refresh_token)
    for server in (here, there):
        assert (await validate(server, refreshed.access_token)).valid
    # A replica started afterwards loads the revocation at start.
    late = await server_factory()
    await assert_revoked(late, before[1].access_token)
    assert (await validate(late, refreshed.access_token)).valid
    # Its new session can log out everywhere in turn (the generation moves on).
    assert await logout_everywhere(here, str(user.id), refreshed.access_token) == 1
    await assert_revoked(here, refreshed.access_token)
    await eventually_revoked(late, refreshed.access_token)


async def test_a_grace_window_replay_after_a_logout_everywhere_signs_nothing(
    server: LiveServer,
) -> None:
    user = await server.create_user("gus")
    pair = await server.login("gus")
    child = await refresh(server, pair.refresh_token)
    await logout_everywhere(server, str(user.id), child.access_token)
    # Within the grace window, the parent would give the same child again: not any more.
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")
    await refresh_fails(server, child.refresh_token, "SESSION_REVOKED")


async def test_a_users_revocation_is_remembered_until_their_latest_token_expires(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    """A Refresh whose token expires past the user's stored bound raises it first (a step
    past the token), so the revocation announced later covers that token to its end: a
    replica starting just before it expires still refuses it."""
    server = await server_factory(access_ttl=900)
    user = await server.create_user("ray")
    pair = await server.login("ray")
    bound = await server.pool.fetchval(
        "SELECT access_expires_max FROM users WHERE id = $1", user.id
    )
    assert bound == to_datetime(int(clock.now()) + 900 + USER_BOUND_STEP_SECONDS)
    clock.advance(USER_BOUND_STEP_SECONDS + 400)
    refreshed = await refresh(server, pair.refresh_token)
    expires_at = refreshed.access_token_expires_at.seconds
    assert expires_at > bound.timestamp()
    raised = await server.pool.fetchval(
        "SELECT access_expires_max FROM users WHERE id = $1", user.id
    )
    assert raised == to_datetime(expires_at + USER_BOUND_STEP_SECONDS)

    await logout_everywhere(server, str(user.id), refreshed.access_token)
    until = await server.pool.fetchval(
        "SELECT revoked_sessions_until FROM users WHERE id = $1", user.id
    )
    assert until == raised
    # Just before the token expires: past what the bound before the refresh would cover.
    clock.advance(expires_at - clock.now() - 1)
    assert clock.now() > bound.timestamp() + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS
    late = await server_factory(access_ttl=900)
    await assert_revoked(late, refreshed.access_token)
    await assert_revoked(server, refreshed.access_token)


async def test_refreshes_write_the_users_row_only_once_per_step(
    server: LiveServer, clock: ManualClock
) -> None:
    user = await server.create_user("ida")
    pair = await server.login("ida")

    async def user_row_version() -> str:
        version: str = await server.pool.fetchval(
            "SELECT xmin::text FROM users WHERE id = $1", user.id
        )
        return version

    version = await user_row_version()
    for _ in range(5):
        clock.advance(60)
        pair = await refresh(server, pair.refresh_token)
    assert await user_row_version() == version


async def test_admin_views_drop_a_users_revoked_sessions_before_the_janitor_marks_them(
    server: LiveServer,
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    user = await server.create_user("liv")
    old = [await server.login("liv") for _ in range(3)]
    await logout_everywhere(server, str(user.id), old[0].access_token)
    new = await server.login("liv")
    selector = admin_pb2.UserSelector(user_id=str(user.id))
    listed = await admin.ListSessions(admin_pb2.ListSessionsRequest(user=selector))
    assert [s.session_id for s in listed.sessions] == [new.session_id]
    # Ended already: revoking it again revokes nothing.
    again = await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=old[1].session_id))
    assert again.revoked_sessions == 0
    assert (
        await server.pool.fetchval(
            "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL", user.id
        )
        == 4
    )

    assert await server.running.components.janitor.catch_up_user_revocations() == 3
    rows = await server.pool.fetch(
        "SELECT id, revoked_at, revoke_reason FROM sessions WHERE user_id = $1", user.id
    )
    marked = {str(r["id"]): (r["revoked_at"], r["revoke_reason"]) for r in rows}
    revoked_at = await server.pool.fetchval(
        "SELECT sessions_revoked_at FROM users WHERE id = $1", user.id
    )
    for pair in old:
        assert marked[pair.session_id] == (revoked_at, "logout_everywhere")
    assert marked[new.session_id] == (None, None)
    assert not await server.pool.fetchval(
        "SELECT sessions_revoke_pending FROM users WHERE id = $1", user.id
    )
    assert await server.running.components.janitor.catch_up_user_revocations() == 0


async def test_the_catch_up_leaves_a_newer_revocation_pending(server: LiveServer) -> None:
    """A revocation that comes while the janitor works on the one before it is not marked
    done with it: its sessions are marked on the next run."""
    user = await server.create_user("pia")
    first = await server.login("pia")
    await logout_everywhere(server, str(user.id), first.access_token)
    second = await server.login("pia")
    store = server.running.components.store
    # The janitor reads the first revocation, then the second one lands.
    await store.catch_up_user_revocations(batch=10, max_batches=1)
    await logout_everywhere(server, str(user.id), second.access_token)
    assert await store.catch_up_user_revocations(batch=10, max_batches=5) == 1
    assert (
        await server.pool.fetchval(
            "SELECT count(*) FROM sessions WHERE user_id = $1 AND revoked_at IS NULL", user.id
        )
        == 0
    )


async def test_a_disabled_user_revoked_twice_counts_nothing_the_second_time(
    server: LiveServer,
) -> None:
    user = await server.create_user("dot")
    pair = await server.login("dot")
    users = server.running.components.users
    assert await users.set_disabled(user.id, True) == 1
    assert await users.set_disabled(user.id, True) == 0
    await users.set_disabled(user.id, False)
    await assert_revoked(server, pair.access_token)
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")
    fresh = await server.login("dot")
    assert (await validate(server, fresh.access_token)).valid


# Pure parts


def test_user_entries_keep_the_highest_generation_and_the_latest_bound() -> None:
    state = RevocationState()
    state.add_users([UserRevocation("u", 2, 1000.0, 1900.0)])
    assert state.is_revoked_for_user("u", 1)
    assert not state.is_revoked_for_user("u", 2)
    assert not state.is_revoked_for_user("other", 0)
    # An older revocation arriving late (a poll) changes nothing.
    state.add_users([UserRevocation("u", 1, 900.0, 1500.0)])
    assert state.is_revoked_for_user("u", 1) and not state.is_revoked_for_user("u", 2)
    forget_at = 1900.0 + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS
    assert state.prune(forget_at - 0.001) == 0
    assert state.revoked_users == 1
    assert state.prune(forget_at) == 1
    assert not state.is_revoked_for_user("u", 0)


@pytest.mark.parametrize("raw", ["0", "10001", "-1", "many", "1.5"])
def test_the_session_cap_setting_is_checked(raw: str) -> None:
    with pytest.raises(SettingsError, match="AUTH_MAX_SESSIONS_PER_USER"):
        Settings.from_env({"AUTH_MAX_SESSIONS_PER_USER": raw})


def test_the_session_cap_setting_accepts_its_range() -> None:
    assert Settings.from_env({}).max_sessions_per_user == 100
    for value in (1, 10_000):
        env = {"AUTH_MAX_SESSIONS_PER_USER": str(value)}
        assert Settings.from_env(env).max_sessions_per_user == value


async def test_a_revoked_users_bound_is_in_the_database_too(server: LiveServer) -> None:
    """What the start-up load reads: the generation, when, and until when."""
    user = await server.create_user("eve")
    pair = await server.login("eve")
    await logout_everywhere(server, str(user.id), pair.access_token)
    row = await server.pool.fetchrow(
        """SELECT session_generation, sessions_revoked_at, sessions_revoke_reason,
                  revoked_sessions_until, access_expires_max FROM users WHERE id = $1""",
        user.id,
    )
    assert row["session_generation"] == 1
    assert row["sessions_revoked_at"] == to_datetime(server.clock.now())
    assert row["sessions_revoke_reason"] == "logout_everywhere"
    assert row["revoked_sessions_until"] == row["access_expires_max"]
    expires_at = to_datetime(pair.access_token_expires_at.seconds)
    assert row["revoked_sessions_until"] >= expires_at
    assert row["revoked_sessions_until"] - expires_at <= (
        timedelta(seconds=USER_BOUND_STEP_SECONDS)
    )


async def test_a_login_that_waited_for_a_logout_everywhere_gets_the_new_generation(
    server: LiveServer,
) -> None:
    """A login whose insert meets a logout everywhere in flight waits for the user's row
    and starts under the new generation: its token is valid."""
    user = await server.create_user("kim")
    pair = await server.login("kim")
    lock = await server.pool.acquire()
    try:
        transaction = lock.transaction()
        await transaction.start()
        await lock.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user.id)
        login = asyncio.create_task(server.login("kim"))
        await asyncio.sleep(0.3)  # the login is waiting for the row
        assert not login.done()
        await lock.execute(
            "UPDATE users SET session_generation = session_generation + 1 WHERE id = $1",
            user.id,
        )
        await transaction.commit()
    finally:
        await server.pool.release(lock)
    fresh = await login
    claims_generation = await server.pool.fetchval(
        "SELECT user_generation FROM sessions WHERE id = $1", uuid.UUID(fresh.session_id)
    )
    assert claims_generation == 1
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")
    assert (await validate(server, fresh.access_token)).valid
