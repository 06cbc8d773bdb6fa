"""Refresh-token families over gRPC: reuse detection, the grace window, concurrency,
idle and absolute expiry, access-token expiry, scopes on refresh, token format.

Everything runs against the live server and a real PostgreSQL; time moves only
through the `clock` fixture, which the server uses for tokens and database rows.
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2

from service.clock import ManualClock
from tests.helpers import assert_error, refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory

Code = grpc.StatusCode
REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED
EXPIRED = auth_pb2.VALIDATION_ERROR_EXPIRED
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


# Helpers


async def rotated_token_of_dead_family_fails(server: LiveServer, token: str) -> None:
    """An already-rotated token presented outside the grace window is reuse, even when
    its family is dead already: every replay of a stolen token is reported and recorded."""
    await refresh_fails(server, token, "REFRESH_TOKEN_REUSED")


async def assert_valid(server: LiveServer, token: str) -> auth_pb2.ValidateResponse:
    verdict = await validate(server, token)
    assert verdict.valid, auth_pb2.ValidationError.Name(verdict.error)
    return verdict


async def assert_invalid(server: LiveServer, token: str, error: int) -> None:
    verdict = await validate(server, token)
    assert not verdict.valid
    assert verdict.error == error, auth_pb2.ValidationError.Name(verdict.error)


async def token_rows(server: LiveServer, session_id: str) -> int:
    count: int = await server.pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE session_id = $1", uuid.UUID(session_id)
    )
    return count


# 1. Reuse detection kills exactly one family


async def test_reuse_revokes_the_whole_family_and_no_other(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(refresh_reuse_grace=0)
    alice = await server.create_user("alice", scopes=("read",))
    await server.create_user("bob", scopes=("read",))
    a1 = await server.login("alice")
    b = await server.login("alice")
    c = await server.login("bob")
    assert len({a1.session_id, b.session_id, c.session_id}) == 3

    a2 = await refresh(server, a1.refresh_token)
    a3 = await refresh(server, a2.refresh_token)
    assert a1.session_id == a2.session_id == a3.session_id
    assert len({a1.refresh_token, a2.refresh_token, a3.refresh_token}) == 3
    for pair in (a1, a2, a3, b, c):
        await assert_valid(server, pair.access_token)

    # The thief (or the victim) presents the first token again.
    await refresh_fails(server, a1.refresh_token, "REFRESH_TOKEN_REUSED")

    # Every refresh token of family A is dead, the newest (never used) one too.
    await refresh_fails(server, a3.refresh_token, "SESSION_REVOKED")
    for token in (a2.refresh_token, a1.refresh_token):
        await rotated_token_of_dead_family_fails(server, token)
    # Presenting the rotated tokens again revoked nothing else.
    await refresh_fails(server, a3.refresh_token, "SESSION_REVOKED")
    # Every access token carrying A's sid is revoked.
    for pair in (a1, a2, a3):
        await assert_invalid(server, pair.access_token, REVOKED)

    # Family B (same user) and family C (another user) live on.
    for pair in (b, c):
        await assert_valid(server, pair.access_token)
        rotated = await refresh(server, pair.refresh_token)
        assert rotated.session_id == pair.session_id
        verdict = await assert_valid(server, rotated.access_token)
        assert verdict.session_id == pair.session_id
        await refresh(server, rotated.refresh_token)

    # Each replay left a security event behind: time, session, subject, peer (the first
    # one on its own, and the two replays into the dead family in one row, counted).
    rows = await server.pool.fetch(
        """SELECT occurred_at, session_id, subject, peer, occurrences FROM security_events
            WHERE kind = 'refresh_token_reused' ORDER BY id"""
    )
    assert [r["occurrences"] for r in rows] == [1, 2]
    event = rows[0]
    assert event["session_id"] == uuid.UUID(a1.session_id)
    assert event["subject"] == str(alice.id)
    assert event["peer"]
    assert event["occurred_at"].timestamp() == server.clock.now()
    revoked = await server.pool.fetch("SELECT id FROM sessions WHERE revoked_at IS NOT NULL")
    assert [r["id"] for r in revoked] == [uuid.UUID(a1.session_id)]


async def test_reuse_of_a_grandparent_outside_the_grace_window_by_clock(
    server: LiveServer, clock: ManualClock
) -> None:
    """The default server (grace 10 s): an old token presented 11 s later is reuse."""
    await server.create_user("alice")
    a1 = await server.login("alice")
    a2 = await refresh(server, a1.refresh_token)
    clock.advance(11)
    await refresh_fails(server, a1.refresh_token, "REFRESH_TOKEN_REUSED")
    await refresh_fails(server, a2.refresh_token, "SESSION_REVOKED")
    await assert_invalid(server, a2.access_token, REVOKED)


# 2. The grace window


async def test_grace_window_replays_the_identical_child(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("alice", scopes=("read",))
    parent = await server.login("alice")
    child = await refresh(server, parent.refresh_token)
    assert child.refresh_token != parent.refresh_token

    clock.advance(5)
    again = await refresh(server, parent.refresh_token)
    assert again.refresh_token == child.refresh_token
    assert again.session_id == child.session_id == parent.session_id
    assert again.refresh_token_expires_at == child.refresh_token_expires_at
    assert list(again.scopes) == ["read"]
    verdict = await assert_valid(server, again.access_token)
    assert verdict.session_id == parent.session_id
    # Still inside the window (9 s after the rotation): the same answer again.
    clock.advance(4)
    third = await refresh(server, parent.refresh_token)
    assert third.refresh_token == child.refresh_token
    await assert_valid(server, third.access_token)
    # Only one child was ever stored.
    assert await token_rows(server, parent.session_id) == 2

    # The child is used; from now on the parent is plain reuse.
    grandchild = await refresh(server, child.refresh_token)
    assert grandchild.refresh_token not in (parent.refresh_token, child.refresh_token)
    await refresh_fails(server, parent.refresh_token, "REFRESH_TOKEN_REUSED")
    # ...and the family is dead.
    await refresh_fails(server, grandchild.refresh_token, "SESSION_REVOKED")
    for pair in (parent, child, again, grandchild):
        await assert_invalid(server, pair.access_token, REVOKED)


async def test_parent_after_the_grace_window_is_reuse_even_if_the_child_is_unused(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("alice")
    parent = await server.login("alice")
    child = await refresh(server, parent.refresh_token)
    clock.advance(11)
    await refresh_fails(server, parent.refresh_token, "REFRESH_TOKEN_REUSED")
    # The unused child dies with its family.
    await refresh_fails(server, child.refresh_token, "SESSION_REVOKED")
    await assert_invalid(server, child.access_token, REVOKED)


async def test_grandparent_within_the_grace_window_is_reuse(
    server: LiveServer, clock: ManualClock
) -> None:
    """django-oauth-toolkit #1617: only the immediate parent may be replayed."""
    await server.create_user("alice")
    grandparent = await server.login("alice")
    parent = await refresh(server, grandparent.refresh_token)
    clock.advance(1)
    child = await refresh(server, parent.refresh_token)
    clock.advance(1)
    # Two seconds after its rotation: well within the window, still reuse.
    await refresh_fails(server, grandparent.refresh_token, "REFRESH_TOKEN_REUSED")
    await refresh_fails(server, child.refresh_token, "SESSION_REVOKED")
    await assert_invalid(server, child.access_token, REVOKED)


async def test_replay_within_the_grace_window_of_a_revoked_session_is_refused(
    server: LiveServer,
) -> None:
    """The window only helps a live session: after a Revoke the parent gets nothing.

    Within the window a replay looks like a client's retry, not theft, so the
    answer is the truth about the family (SESSION_REVOKED), not reuse."""
    await server.create_user("alice")
    parent = await server.login("alice")
    await refresh(server, parent.refresh_token)
    revoked = await server.stub.Revoke(auth_pb2.RevokeRequest(refresh_token=parent.refresh_token))
    assert revoked.revoked_sessions == 1
    await refresh_fails(server, parent.refresh_token, "SESSION_REVOKED")


# 3. Fifty concurrent refreshes of one token


async def test_concurrent_refresh_with_grace_all_get_the_identical_child(
    server: LiveServer,
) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    results = await asyncio.gather(
        *(
            server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
            for _ in range(50)
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    responses = [r for r in results if isinstance(r, auth_pb2.RefreshResponse)]
    assert len(responses) == 50
    children = {r.tokens.refresh_token for r in responses}
    assert len(children) == 1
    child = children.pop()
    assert child != pair.refresh_token
    assert {r.tokens.session_id for r in responses} == {pair.session_id}
    # Exactly one child in the database: the login token and it.
    assert await token_rows(server, pair.session_id) == 2
    for response in responses[:5]:
        await assert_valid(server, response.tokens.access_token)
    # The one child works like any refresh token.
    grandchild = await refresh(server, child)
    assert await token_rows(server, pair.session_id) == 3
    await assert_valid(server, grandchild.access_token)


async def wait_for_lock_waiters(server: LiveServer, count: int) -> None:
    """Until `count` backends of this test database wait on a row lock."""
    for _ in range(500):
        waiting = await server.pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'"""
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} calls waited on the token's row lock")


async def test_refresh_calls_queued_on_the_row_lock_agree_on_one_child(
    server: LiveServer, server_factory: ServerFactory
) -> None:
    """A deterministic form of the race above: two Refresh calls of one token, one to each
    of two replicas, queue behind a lock held by the test; when it is released, one
    rotates and the other (whose statement started before that rotation committed) must
    replay its child. (Within one process the second call would not start its statement
    beside the first: the batches of fresh rotations never hold one token twice.)"""
    replica = await server_factory()
    await server.create_user("alice")
    pair = await server.login("alice")
    token_hash = await server.pool.fetchval(
        "SELECT token_hash FROM refresh_tokens WHERE session_id = $1",
        uuid.UUID(pair.session_id),
    )
    async with server.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(
            "SELECT 1 FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE", token_hash
        )
        calls = [
            asyncio.ensure_future(
                live.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
            )
            for live in (server, replica)
        ]
        await wait_for_lock_waiters(server, 2)
        await transaction.rollback()
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors
    responses = [r for r in results if isinstance(r, auth_pb2.RefreshResponse)]
    assert len({r.tokens.refresh_token for r in responses}) == 1
    assert await token_rows(server, pair.session_id) == 2


async def test_concurrent_refresh_without_grace_exactly_one_wins(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(refresh_reuse_grace=0)
    await server.create_user("alice")
    pair = await server.login("alice")
    results = await asyncio.gather(
        *(
            server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
            for _ in range(50)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, auth_pb2.RefreshResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 49
    for error in losers:
        assert_error(error, Code.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    # Never two children: the login token and the winner's.
    assert await token_rows(server, pair.session_id) == 2
    # A reuse revokes the session, so the winner's tokens are dead too.
    winner = winners[0].tokens
    await refresh_fails(server, winner.refresh_token, "SESSION_REVOKED")
    await assert_invalid(server, winner.access_token, REVOKED)


# 4. Idle expiry


async def test_idle_expiry_and_each_rotation_opens_a_new_idle_window(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(refresh_idle_ttl=60)
    await server.create_user("alice")
    login_at = clock.now()
    pair = await server.login("alice")
    idle = await server.login("alice")
    assert pair.refresh_token_expires_at.seconds == login_at + 60
    assert pair.refresh_token_expires_at.nanos == 0

    clock.advance(30)
    first = await refresh(server, pair.refresh_token)
    assert first.refresh_token_expires_at.seconds == login_at + 30 + 60

    clock.advance(31)  # login + 61: past the login token's window, inside the child's
    await refresh_fails(server, idle.refresh_token, "REFRESH_TOKEN_EXPIRED")
    second = await refresh(server, first.refresh_token)
    assert second.refresh_token_expires_at.seconds == login_at + 61 + 60

    clock.advance(61)  # 61 s after the last rotation
    await refresh_fails(server, second.refresh_token, "REFRESH_TOKEN_EXPIRED")
    # Expiry is not theft: the session was not revoked by it.
    revoked_at = await server.pool.fetchval(
        "SELECT revoked_at FROM sessions WHERE id = $1", uuid.UUID(pair.session_id)
    )
    assert revoked_at is None


async def test_idle_expiry_boundary(server_factory: ServerFactory, clock: ManualClock) -> None:
    server = await server_factory(refresh_idle_ttl=60)
    await server.create_user("alice")
    early = await server.login("alice")
    late = await server.login("alice")
    clock.advance(59)
    await refresh(server, early.refresh_token)
    clock.advance(1)
    await refresh_fails(server, late.refresh_token, "REFRESH_TOKEN_EXPIRED")


# 5. Absolute expiry


async def test_rotation_never_extends_the_absolute_lifetime(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(refresh_idle_ttl=60, refresh_absolute_ttl=100)
    await server.create_user("alice")
    login_at = clock.now()
    pair = await server.login("alice")
    assert pair.refresh_token_expires_at.seconds == login_at + 60  # the earlier bound

    token = pair.refresh_token
    expiries = []
    for _ in range(2):
        clock.advance(40)
        rotated = await refresh(server, token)
        expiries.append(rotated.refresh_token_expires_at.seconds)
        assert rotated.refresh_token_expires_at.seconds <= login_at + 100
        token = rotated.refresh_token
    # At +40 the idle bound (+100) and the absolute bound (+100) meet; at +80 the
    # idle bound (+140) is later, so the absolute one is reported.
    assert expiries == [login_at + 100, login_at + 100]

    clock.advance(20)  # login + 100
    await refresh_fails(server, token, "REFRESH_TOKEN_EXPIRED")


async def test_absolute_expiry_one_second_before_and_at_the_bound(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(refresh_idle_ttl=60, refresh_absolute_ttl=100)
    await server.create_user("alice")
    pair = await server.login("alice")
    clock.advance(50)
    token = (await refresh(server, pair.refresh_token)).refresh_token
    clock.advance(49)  # login + 99
    token = (await refresh(server, token)).refresh_token
    clock.advance(1)  # login + 100
    await refresh_fails(server, token, "REFRESH_TOKEN_EXPIRED")


# 6. Access-token expiry and leeway


async def test_access_token_expiry(server_factory: ServerFactory, clock: ManualClock) -> None:
    server = await server_factory(access_ttl=60)
    await server.create_user("alice")
    issued_at = clock.now()
    pair = await server.login("alice")
    assert pair.access_token_expires_at.seconds == issued_at + 60
    verdict = await assert_valid(server, pair.access_token)
    assert verdict.expires_at.seconds == issued_at + 60
    clock.advance(61)
    await assert_invalid(server, pair.access_token, EXPIRED)


async def test_access_token_leeway(server_factory: ServerFactory, clock: ManualClock) -> None:
    server = await server_factory(access_ttl=60, leeway=5)
    await server.create_user("alice")
    pair = await server.login("alice")
    clock.advance(62)
    await assert_valid(server, pair.access_token)
    clock.advance(4)  # +66
    await assert_invalid(server, pair.access_token, EXPIRED)


async def test_a_refreshed_access_token_gets_a_fresh_lifetime(
    server_factory: ServerFactory, clock: ManualClock
) -> None:
    server = await server_factory(access_ttl=60)
    await server.create_user("alice")
    pair = await server.login("alice")
    clock.advance(50)
    rotated = await refresh(server, pair.refresh_token)
    assert rotated.access_token_expires_at.seconds == clock.now() + 60
    clock.advance(20)
    await assert_invalid(server, pair.access_token, EXPIRED)
    await assert_valid(server, rotated.access_token)


# 7. Refresh never widens the grant


async def test_refresh_keeps_the_granted_subset(server: LiveServer) -> None:
    await server.create_user("alice", scopes=("a", "b"))
    pair = await server.login("alice", scopes=("a",))
    assert list(pair.scopes) == ["a"]
    rotated = await refresh(server, pair.refresh_token)
    assert list(rotated.scopes) == ["a"]
    verdict = await assert_valid(server, rotated.access_token)
    assert list(verdict.scopes) == ["a"]
    rotated = await refresh(server, rotated.refresh_token)
    assert list(rotated.scopes) == ["a"]


async def test_refresh_drops_scopes_the_user_no_longer_holds(server: LiveServer) -> None:
    await server.create_user("alice", scopes=("a", "b"))
    narrow = await server.login("alice", scopes=("a",))
    wide = await server.login("alice")
    assert set(wide.scopes) == {"a", "b"}

    await server.pool.execute("UPDATE users SET scopes = ARRAY['b'] WHERE username = 'alice'")

    rotated = await refresh(server, narrow.refresh_token)
    assert "a" not in rotated.scopes
    assert list(rotated.scopes) == []
    verdict = await assert_valid(server, rotated.access_token)
    assert "a" not in verdict.scopes

    rotated_wide = await refresh(server, wide.refresh_token)
    assert list(rotated_wide.scopes) == ["b"]
    verdict = await assert_valid(server, rotated_wide.access_token)
    assert list(verdict.scopes) == ["b"]

    # Giving the scope back does not widen a session beyond what it was granted.
    await server.pool.execute(
        "UPDATE users SET scopes = ARRAY['a', 'b', 'c'] WHERE username = 'alice'"
    )
    rotated = await refresh(server, rotated.refresh_token)
    assert list(rotated.scopes) == ["a"]
    rotated_wide = await refresh(server, rotated_wide.refresh_token)
    assert set(rotated_wide.scopes) == {"a", "b"}


# 8. Refresh-token format and uniqueness


async def test_refresh_tokens_are_256_bit_base64url_and_all_distinct(server: LiveServer) -> None:
    await server.create_user("alice")
    tokens: list[str] = []
    for _ in range(10):
        pair = await server.login("alice")
        tokens.append(pair.refresh_token)
        for _ in range(19):
            pair = await refresh(server, pair.refresh_token)
            tokens.append(pair.refresh_token)
    assert len(tokens) == 200
    assert len(set(tokens)) == 200
    for token in tokens:
        assert TOKEN_RE.fullmatch(token), token
        assert len(base64.urlsafe_b64decode(token + "=")) == 32
    # No token's text appears in the database, only hashes.
    stored = await server.pool.fetch("SELECT token_hash FROM refresh_tokens")
    assert len(stored) == 200
    hashes = {bytes(r["token_hash"]) for r in stored}
    for token in tokens[:20]:
        assert token.encode() not in hashes
        assert base64.urlsafe_b64decode(token + "=") not in hashes
