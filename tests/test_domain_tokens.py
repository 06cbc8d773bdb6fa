"""The token lifecycle through the domain alone, over in-memory fakes of its storage ports
(tests/domain_fakes.py): Issue, Refresh (rotation, grace-window replay, reuse), Revoke and
Validate, in milliseconds. The same behaviour over gRPC and PostgreSQL is what
test_refresh_families, test_revoke and test_user_revocation check."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

from service.clock import to_datetime
from service.domain.access_tokens import TokenProblem
from service.domain.records import CallerInfo
from service.domain.refresh_tokens import hash_token, user_bound
from service.domain.revocation import USER_BOUND_STEP_SECONDS
from service.domain.tokens import TokenPair
from service.errors import (
    CallerUnauthenticated,
    InvalidArgument,
    InvalidCredentials,
    RefreshTokenExpired,
    RefreshTokenInvalid,
    RefreshTokenReused,
    ScopeNotAllowed,
    SessionRevoked,
)
from tests.domain_fakes import POLICY, Domain, domain

HERE = CallerInfo(peer="ipv4:192.0.2.1:5000", user_agent="test")
ELSEWHERE = CallerInfo(peer="ipv4:198.51.100.9:6000")


async def _with_user(
    name: str = "alice", scopes: tuple[str, ...] = ("read", "write")
) -> tuple[Domain, uuid.UUID]:
    d = await domain()
    user = await d.users.create(name, "correct horse", scopes)
    return d, user.id


async def _login(
    d: Domain,
    name: str = "alice",
    *,
    password: str = "correct horse",
    scopes: tuple[str, ...] = (),
    audience: str | None = None,
) -> TokenPair:
    return await d.tokens.issue(
        username=name, password=password, scopes=scopes, audience=audience, caller=HERE
    )


def _problem(d: Domain, token: str) -> TokenProblem | None:
    return d.validator.validate(token, required_scopes=(), audience=None).problem


# Issue


async def test_a_login_starts_a_session_whose_access_token_validates() -> None:
    d, user_id = await _with_user()
    pair = await _login(d, scopes=("read",))
    validation = d.validator.validate(pair.access_token, required_scopes=("read",), audience="api")
    assert validation.problem is None and validation.claims is not None
    assert validation.claims.subject == str(user_id)
    assert validation.claims.session_id == pair.session_id
    assert pair.scopes == ("read",)
    session = d.store.sessions[uuid.UUID(pair.session_id)]
    assert session.user_id == user_id and session.peer == HERE.peer
    assert session.access_expires_max.timestamp() == pair.access_token_expires_at
    assert d.store.kinds()[-1] == "login_succeeded"
    assert d.telemetry.counts["login_succeeded"] == 1


async def test_a_wrong_password_and_an_unknown_user_fail_alike_and_are_recorded() -> None:
    d, _ = await _with_user()
    for name, password in (("alice", "wrong"), ("nobody", "correct horse")):
        with pytest.raises(InvalidCredentials):
            await _login(d, name, password=password)
    assert d.store.kinds()[-2:] == ["login_failed", "login_failed"]
    assert d.telemetry.counts["login_failed"] == 2
    assert not d.store.sessions


async def test_issue_refuses_unknown_audiences_and_ungranted_scopes() -> None:
    d, _ = await _with_user()
    with pytest.raises(InvalidArgument):
        await _login(d, audience="elsewhere")
    with pytest.raises(ScopeNotAllowed):
        await _login(d, scopes=("admin",))
    other = await _login(d, audience="other-api")
    assert d.validator.validate(other.access_token, required_scopes=(), audience="other-api").claims


async def test_a_disabled_user_cannot_log_in() -> None:
    d, _ = await _with_user()
    await d.users.set_disabled("alice", True)
    with pytest.raises(InvalidCredentials):
        await _login(d)


async def test_the_session_cap_revokes_the_oldest_session_here_at_once() -> None:
    d, _ = await _with_user()
    pairs = []
    for _ in range(POLICY.max_sessions_per_user + 1):
        pairs.append(await _login(d))
        d.clock.advance(1)
    assert _problem(d, pairs[0].access_token) is TokenProblem.REVOKED
    assert all(_problem(d, p.access_token) is None for p in pairs[1:])
    assert d.telemetry.counts["revoked_session_limit"] == 1
    with pytest.raises(SessionRevoked):
        await d.tokens.refresh(pairs[0].refresh_token, caller=HERE)


# Refresh


async def test_a_refresh_rotates_the_token_and_signs_a_new_access_token() -> None:
    d, _ = await _with_user()
    pair = await _login(d)
    d.clock.advance(60)
    child = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert child.refresh_token != pair.refresh_token
    assert child.session_id == pair.session_id
    assert child.access_token_expires_at == pair.access_token_expires_at + 60
    assert _problem(d, child.access_token) is None
    parent = d.store.tokens[hash_token(pair.refresh_token)]
    assert parent.used_at is not None and parent.child_hash == hash_token(child.refresh_token)
    session = d.store.sessions[uuid.UUID(pair.session_id)]
    assert session.access_expires_max.timestamp() == child.access_token_expires_at
    assert session.last_refreshed_peer == HERE.peer
    # One transaction per refresh; a rotation records no event.
    assert d.store.refreshes == 1 and d.store.kinds()[-1] == "login_succeeded"


async def test_a_revocation_that_lands_during_a_refresh_stops_it() -> None:
    """Every session of the user is revoked after the token was read, before the rotation
    (or a replay's bound) is written: nothing is written, no token signed, SessionRevoked."""
    d, user_id = await _with_user()

    def revoke_meanwhile() -> None:
        d.store.after_lock = None
        d.store._revoke_user(d.store.users[user_id], to_datetime(d.clock.now()))

    for replay in (False, True):
        pair = await _login(d)
        child = await d.tokens.refresh(pair.refresh_token, caller=HERE)
        d.store.after_lock = revoke_meanwhile
        with pytest.raises(SessionRevoked):
            await d.tokens.refresh(
                pair.refresh_token if replay else child.refresh_token, caller=HERE
            )
        assert d.store.after_lock is None  # it did land in between
        assert d.store.tokens[hash_token(child.refresh_token)].used_at is None
        assert d.store.kinds()[-1] == "login_succeeded"  # nothing recorded


async def test_unknown_malformed_and_expired_refresh_tokens_are_refused() -> None:
    d, _ = await _with_user()
    with pytest.raises(RefreshTokenInvalid):
        await d.tokens.refresh("not a token", caller=HERE)
    with pytest.raises(RefreshTokenInvalid):
        await d.tokens.refresh("A" * 43, caller=HERE)
    pair = await _login(d)
    d.clock.advance(POLICY.refresh_idle_ttl)
    with pytest.raises(RefreshTokenExpired):
        await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert d.store.refreshes == 2  # the malformed one never reached the store


async def test_a_replay_within_the_grace_window_returns_the_same_child() -> None:
    d, _ = await _with_user()
    pair = await _login(d)
    first = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    again = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert again.refresh_token == first.refresh_token
    assert _problem(d, again.access_token) is None
    replayed = d.store.events[-1]
    assert replayed.kind == "refresh_token_replayed"
    assert replayed.detail == {"verdict": "retry"}
    d.clock.advance(2)
    await d.tokens.refresh(pair.refresh_token, caller=ELSEWHERE)
    suspicious = d.store.events[-1]
    assert suspicious.detail is not None and suspicious.detail["verdict"] == "suspicious"
    assert suspicious.detail["reason"] == "different_peer,late"
    assert d.telemetry.counts == {
        **d.telemetry.counts,
        "replayed_retry": 1,
        "replayed_suspicious": 1,
    }


async def test_concurrent_refreshes_of_one_token_share_one_child() -> None:
    d, _ = await _with_user()
    pair = await _login(d)
    children = await asyncio.gather(
        *(d.tokens.refresh(pair.refresh_token, caller=HERE) for _ in range(5))
    )
    assert len({c.refresh_token for c in children}) == 1
    assert sum(t.session_id == uuid.UUID(pair.session_id) for t in d.store.tokens.values()) == 2


async def test_reuse_after_the_grace_window_revokes_the_family_here_at_once() -> None:
    d, user_id = await _with_user()
    pair = await _login(d)
    child = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    d.clock.advance(POLICY.refresh_reuse_grace)
    with pytest.raises(RefreshTokenReused):
        await d.tokens.refresh(pair.refresh_token, caller=ELSEWHERE)
    # Every token of the family is refused now, by this process, without a notification.
    assert _problem(d, child.access_token) is TokenProblem.REVOKED
    assert _problem(d, pair.access_token) is TokenProblem.REVOKED
    with pytest.raises(SessionRevoked):
        await d.tokens.refresh(child.refresh_token, caller=HERE)
    reused = d.store.events[-1]
    assert reused.kind == "refresh_token_reused" and reused.subject == str(user_id)
    assert reused.aggregate_key is None  # the first detection: a row of its own
    assert d.telemetry.counts["reuse_detected"] == 1
    assert d.telemetry.counts["revoked_reuse"] == 1

    # Again, into the dead family: recorded (aggregated), detected, not counted as revoked.
    with pytest.raises(RefreshTokenReused):
        await d.tokens.refresh(pair.refresh_token, caller=ELSEWHERE)
    again = d.store.events[-1]
    assert again.detail == {"unchanged": "true"} and again.aggregate_key is not None
    assert d.telemetry.counts["reuse_detected"] == 2
    assert d.telemetry.counts["revoked_reuse"] == 1


async def test_reuse_is_detected_in_a_replica_that_learns_of_it_from_the_store() -> None:
    """Another process (a second domain over the same store) detects the reuse; this one
    refuses the family's refresh tokens at once, its access tokens once told."""
    d, _ = await _with_user()
    other = await domain(store=d.store)
    pair = await _login(d)
    await d.tokens.refresh(pair.refresh_token, caller=HERE)
    other.clock.advance(POLICY.refresh_reuse_grace)
    with pytest.raises(RefreshTokenReused):
        await other.tokens.refresh(pair.refresh_token, caller=ELSEWHERE)
    assert other.state.is_revoked(pair.session_id)
    assert not d.state.is_revoked(pair.session_id)  # until the notification arrives


async def test_a_refresh_never_widens_the_grant() -> None:
    d, user_id = await _with_user()
    pair = await _login(d)
    user = d.store.users[user_id]
    user.record = replace(user.record, scopes=("read",))
    child = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert child.scopes == ("read",)


async def test_a_refresh_raises_the_users_bound_a_step_past_the_token() -> None:
    d, user_id = await _with_user()
    pair = await _login(d)
    user = d.store.users[user_id]
    bound = user.access_expires_max
    assert bound.timestamp() == pair.access_token_expires_at + USER_BOUND_STEP_SECONDS
    d.clock.advance(60)  # the bound still covers the next token: nothing written
    child = await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert user.access_expires_max == bound
    user.access_expires_max = to_datetime(child.access_token_expires_at)  # just covered
    d.clock.advance(60)
    grandchild = await d.tokens.refresh(child.refresh_token, caller=HERE)
    assert user.access_expires_max.timestamp() == (
        grandchild.access_token_expires_at + USER_BOUND_STEP_SECONDS
    )


def test_the_users_bound_is_raised_only_when_the_read_one_is_below_the_token() -> None:
    from datetime import timedelta

    from service.domain.records import RefreshTokenState

    exp = to_datetime(2e9)
    state = RefreshTokenState(
        token_hash=b"",
        session_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        issued_at=exp,
        expires_at=exp,
        used_at=None,
        child_hash=None,
        child_expires_at=None,
        child_used=False,
        session_scopes=(),
        session_audience="api",
        session_expires_at=exp,
        session_revoked=False,
        user_scopes=(),
        user_disabled=False,
        user_access_expires_max=exp,
    )
    assert user_bound(state, exp) is None
    later = exp + timedelta(seconds=1)
    assert user_bound(state, later) == later + timedelta(seconds=USER_BOUND_STEP_SECONDS)
    unknown = replace(state, user_access_expires_max=None)
    assert user_bound(unknown, exp) == exp + timedelta(seconds=USER_BOUND_STEP_SECONDS)


# Revoke


async def test_revoking_a_refresh_token_ends_its_session_here_at_once() -> None:
    d, _ = await _with_user()
    pair = await _login(d)
    assert await d.revoke.revoke_refresh_token(pair.refresh_token, caller=HERE) == 1
    assert _problem(d, pair.access_token) is TokenProblem.REVOKED
    assert await d.revoke.revoke_refresh_token(pair.refresh_token, caller=HERE) == 0
    assert await d.revoke.revoke_refresh_token("A" * 43, caller=HERE) == 0
    assert await d.revoke.revoke_refresh_token("junk", caller=HERE) == 0
    assert d.telemetry.counts["revoked_refresh_token"] == 1
    assert d.store.kinds().count("session_revoked") == 1


async def test_revoking_an_expired_access_token_ends_its_session() -> None:
    d, _ = await _with_user()
    pair = await _login(d)
    d.clock.advance(POLICY.access_ttl + 1)
    assert _problem(d, pair.access_token) is TokenProblem.EXPIRED
    assert await d.revoke.revoke_access_token(pair.access_token, caller=HERE) == 1
    with pytest.raises(SessionRevoked):
        await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert await d.revoke.revoke_access_token("a.b.c", caller=HERE) == 0


async def test_revoke_by_session_needs_the_owners_live_token() -> None:
    d, _ = await _with_user()
    await d.users.create("bob", "correct horse", ("read",))
    mine = await _login(d)
    other = await _login(d, "bob")
    for caller_token in (None, "junk", other.access_token):
        with pytest.raises(CallerUnauthenticated):
            await d.revoke.revoke_session(
                mine.session_id, caller_token=caller_token, caller=ELSEWHERE
            )
    refusals = [e for e in d.store.events if e.kind == "revoke_refused"]
    assert [e.detail and e.detail["caller_token"] for e in refusals] == [
        "none",
        "invalid",
        "live",
    ]
    assert _problem(d, mine.access_token) is None
    assert (
        await d.revoke.revoke_session(mine.session_id, caller_token=mine.access_token, caller=HERE)
        == 1
    )
    assert _problem(d, mine.access_token) is TokenProblem.REVOKED
    # Nothing live left to end: the one refusal again (and the token is revoked now).
    with pytest.raises(CallerUnauthenticated):
        await d.revoke.revoke_session(mine.session_id, caller_token=mine.access_token, caller=HERE)


async def test_a_logout_everywhere_revokes_every_session_of_the_user_at_once() -> None:
    d, user_id = await _with_user()
    pairs = [await _login(d) for _ in range(3)]
    count = await d.revoke.revoke_subject(
        str(user_id), caller_token=pairs[0].access_token, caller=HERE
    )
    assert count == 3
    assert all(_problem(d, p.access_token) is TokenProblem.REVOKED for p in pairs)
    assert d.state.revoked_users == 1 and len(d.state) == 0  # one entry for the user
    for pair in pairs:
        with pytest.raises(SessionRevoked):
            await d.tokens.refresh(pair.refresh_token, caller=HERE)
    assert d.telemetry.counts["revoked_subject"] == 3
    # A new login is of the new generation, and valid.
    fresh = await _login(d)
    assert _problem(d, fresh.access_token) is None


async def test_an_operators_changes_end_every_session_through_the_same_path() -> None:
    d, _ = await _with_user()
    first = await _login(d)
    assert await d.users.set_password("alice", "new password") == 1
    assert _problem(d, first.access_token) is TokenProblem.REVOKED
    second = await _login(d, password="new password")
    assert await d.users.set_disabled("alice", True) == 1
    assert _problem(d, second.access_token) is TokenProblem.REVOKED
    assert d.telemetry.counts["revoked_admin"] == 2
    # An operator may end any session, and the call is recorded even if it changed nothing.
    caller = CallerInfo(actor="cli")
    assert await d.users.revoke_session(second.session_id, caller=caller) == 0
    assert d.store.events[-1].detail == {
        "reason": "revoked_by_operator",
        "actor": "cli",
        "unchanged": "true",
    }


# Validate


async def test_validate_checks_audience_scope_and_lifetime() -> None:
    d, _ = await _with_user()
    pair = await _login(d, scopes=("read",))
    check = d.validator.validate
    assert check(pair.access_token, required_scopes=(), audience="other-api").problem is (
        TokenProblem.WRONG_AUDIENCE
    )
    assert check(pair.access_token, required_scopes=("write",), audience=None).problem is (
        TokenProblem.INSUFFICIENT_SCOPE
    )
    d.clock.advance(POLICY.access_ttl)
    assert check(pair.access_token, required_scopes=(), audience=None).problem is (
        TokenProblem.EXPIRED
    )


async def test_tokens_signed_before_a_rotation_still_validate() -> None:
    d, _ = await _with_user()
    before = await _login(d)
    await d.keys.rotate()
    d.clock.advance(1)  # past the activation delay
    after = await _login(d)
    assert before.access_token.split(".")[0] != after.access_token.split(".")[0]  # new kid
    assert _problem(d, before.access_token) is None and _problem(d, after.access_token) is None
    assert len(d.keys.ring.kids) == 2
