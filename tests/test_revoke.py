"""Revoke over gRPC, every target: refresh token, access token, session id, subject;
its caller checks; idempotence (RFC 7009); disabling a user and changing a password.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid

import asyncpg
import grpc
import jwt as pyjwt
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from cryptography.hazmat.primitives.asymmetric import ed25519

from service.clock import ManualClock
from tests.helpers import assert_error, refresh, refresh_fails, validate
from tests.live_server import PASSWORD, LiveServer

Code = grpc.StatusCode
REVOKED = auth_pb2.VALIDATION_ERROR_REVOKED
NEW_PASSWORD = "a brand new passphrase 42"
# Revoke by session_id/subject's one refusal, whatever was wrong (no oracle).
CALLER_REFUSED = "CALLER_UNAUTHENTICATED"
Metadata = tuple[tuple[str, str], ...]


# Helpers


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def b64json(value: object) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def claims_of(token: str) -> dict[str, object]:
    value: dict[str, object] = json.loads(b64d(token.split(".")[1]))
    return value


async def revoke(
    server: LiveServer, request: auth_pb2.RevokeRequest, metadata: Metadata | None = None
) -> int:
    response = await server.stub.Revoke(request, metadata=metadata)
    return response.revoked_sessions


async def revoke_fails(
    server: LiveServer,
    request: auth_pb2.RevokeRequest,
    metadata: Metadata | None,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Revoke(request, metadata=metadata)
    assert_error(caught.value, code, reason)


async def assert_live(server: LiveServer, pair: auth_pb2.TokenPair) -> None:
    """The session's access token validates (its refresh token is left unused)."""
    verdict = await validate(server, pair.access_token)
    assert verdict.valid, auth_pb2.ValidationError.Name(verdict.error)


async def assert_dead(server: LiveServer, pair: auth_pb2.TokenPair) -> None:
    """Access token REVOKED, refresh token SESSION_REVOKED."""
    verdict = await validate(server, pair.access_token)
    assert not verdict.valid
    assert verdict.error == REVOKED, auth_pb2.ValidationError.Name(verdict.error)
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")


async def session_revoked_at(server: LiveServer, session_id: str) -> object:
    return await server.pool.fetchval(
        "SELECT revoked_at FROM sessions WHERE id = $1", uuid.UUID(session_id)
    )


# 1. By refresh token


async def test_revoke_by_refresh_token(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    other = await server.login("alice")

    assert await revoke(server, auth_pb2.RevokeRequest(refresh_token=pair.refresh_token)) == 1
    assert await revoke(server, auth_pb2.RevokeRequest(refresh_token=pair.refresh_token)) == 0
    await assert_dead(server, pair)
    # The user's other session is a different family.
    await assert_live(server, other)
    assert await session_revoked_at(server, other.session_id) is None


async def test_revoke_by_an_already_rotated_refresh_token_ends_its_session(
    server: LiveServer,
) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    rotated = await refresh(server, pair.refresh_token)
    assert await revoke(server, auth_pb2.RevokeRequest(refresh_token=pair.refresh_token)) == 1
    await assert_dead(server, rotated)
    assert await revoke(server, auth_pb2.RevokeRequest(refresh_token=rotated.refresh_token)) == 0


async def test_revoke_unknown_or_malformed_refresh_token_is_ok_with_zero(
    server: LiveServer,
) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    for token in (
        secrets.token_urlsafe(32),  # well-formed, unknown
        "not-a-refresh-token",
        "x" * 8192,
        "\u00e9" * 10,
        "a.b.c",
        pair.access_token,  # an access token is not a refresh token
        pair.refresh_token[:-1],
    ):
        assert await revoke(server, auth_pb2.RevokeRequest(refresh_token=token)) == 0, token
    await assert_live(server, pair)
    assert await session_revoked_at(server, pair.session_id) is None


# 2. By access token


async def test_revoke_by_access_token(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    other = await server.login("alice")
    assert await revoke(server, auth_pb2.RevokeRequest(access_token=pair.access_token)) == 1
    assert await revoke(server, auth_pb2.RevokeRequest(access_token=pair.access_token)) == 0
    await assert_dead(server, pair)
    await assert_live(server, other)


async def test_revoke_by_an_expired_access_token_still_ends_its_session(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    clock.advance(server.settings.access_ttl + 60)
    verdict = await validate(server, pair.access_token)
    assert verdict.error == auth_pb2.VALIDATION_ERROR_EXPIRED
    # The refresh token is still good until the session is revoked...
    assert await session_revoked_at(server, pair.session_id) is None
    assert await revoke(server, auth_pb2.RevokeRequest(access_token=pair.access_token)) == 1
    # ...and is not any more.
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")
    assert await session_revoked_at(server, pair.session_id) is not None


async def test_revoke_by_a_refreshed_access_token_ends_the_family(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    rotated = await refresh(server, pair.refresh_token)
    assert await revoke(server, auth_pb2.RevokeRequest(access_token=rotated.access_token)) == 1
    await assert_dead(server, rotated)
    verdict = await validate(server, pair.access_token)
    assert verdict.error == REVOKED


async def test_revoke_by_forged_or_garbage_access_token_is_zero(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    header_b64, payload_b64, signature_b64 = pair.access_token.split(".")
    claims = claims_of(pair.access_token)
    header = json.loads(b64d(header_b64))

    attacker = ed25519.Ed25519PrivateKey.generate()
    forgeries = [
        "garbage",
        "a.b.c",
        secrets.token_urlsafe(32),
        # alg none with the victim's session id.
        f"{b64json({'alg': 'none', 'typ': 'at+jwt'})}.{payload_b64}.",
        # The genuine signature over a tampered payload.
        f"{header_b64}.{b64json({**claims, 'sub': str(uuid.uuid4())})}.{signature_b64}",
        # Signed by another key under the service's kid.
        pyjwt.encode(claims, attacker, algorithm="EdDSA", headers={"kid": header["kid"]}),
        # Unknown kid.
        f"{b64json({**header, 'kid': 'no-such-key'})}.{payload_b64}.{signature_b64}",
        # A refresh token where an access token belongs.
        pair.refresh_token,
    ]
    for forged in forgeries:
        assert await revoke(server, auth_pb2.RevokeRequest(access_token=forged)) == 0, forged
    await assert_live(server, pair)
    assert await session_revoked_at(server, pair.session_id) is None


# 3. By session id, with the caller's access token


async def test_revoke_by_session_id(server: LiveServer) -> None:
    await server.create_user("alice")
    first = await server.login("alice")
    second = await server.login("alice")
    third = await server.login("alice")

    request = auth_pb2.RevokeRequest(session_id=first.session_id)
    # The caller authenticates with another session of the same user.
    assert await revoke(server, request, bearer(second.access_token)) == 1
    # A repeat ends nothing, so it is refused like a dead caller token would be (an OK
    # here would tell a live token apart: tests/security/test_revoke_oracle.py).
    await revoke_fails(
        server, request, bearer(second.access_token), Code.UNAUTHENTICATED, CALLER_REFUSED
    )
    await assert_dead(server, first)
    await assert_live(server, second)
    await assert_live(server, third)
    assert await refresh(server, third.refresh_token)


async def test_revoke_own_session_with_its_own_token(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    other = await server.login("alice")
    request = auth_pb2.RevokeRequest(session_id=pair.session_id)
    assert await revoke(server, request, bearer(pair.access_token)) == 1
    await assert_dead(server, pair)
    await assert_live(server, other)
    # Repeating it with a live token of the same user ends nothing: refused.
    await revoke_fails(
        server, request, bearer(other.access_token), Code.UNAUTHENTICATED, CALLER_REFUSED
    )
    await assert_live(server, other)


async def test_revoke_by_session_id_caller_checks(server: LiveServer) -> None:
    await server.create_user("alice")
    await server.create_user("bob")
    alice = await server.login("alice")
    bob = await server.login("bob")
    bob_spent = await server.login("bob")
    assert await revoke(server, auth_pb2.RevokeRequest(access_token=bob_spent.access_token)) == 1
    request = auth_pb2.RevokeRequest(session_id=alice.session_id)

    await revoke_fails(
        server, request, bearer(bob.access_token), Code.UNAUTHENTICATED, CALLER_REFUSED
    )
    await revoke_fails(server, request, None, Code.UNAUTHENTICATED, CALLER_REFUSED)
    # A revoked access token authenticates nobody, even for its own user's sessions.
    await revoke_fails(
        server,
        auth_pb2.RevokeRequest(session_id=bob.session_id),
        bearer(bob_spent.access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    # An unknown session is "not yours" as well: no oracle for which ids exist.
    await revoke_fails(
        server,
        auth_pb2.RevokeRequest(session_id=str(uuid.uuid4())),
        bearer(alice.access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    await revoke_fails(
        server,
        auth_pb2.RevokeRequest(session_id="not-a-uuid"),
        bearer(alice.access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    # Nothing refused above changed anything.
    await assert_live(server, alice)
    await assert_live(server, bob)


async def test_an_expired_caller_token_is_unauthenticated(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    clock.advance(server.settings.access_ttl + 1)
    await revoke_fails(
        server,
        auth_pb2.RevokeRequest(session_id=pair.session_id),
        bearer(pair.access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    assert await session_revoked_at(server, pair.session_id) is None


# 4. By subject: log out everywhere


async def test_revoke_by_subject_logs_out_everywhere(server: LiveServer) -> None:
    alice = await server.create_user("alice")
    bob = await server.create_user("bob")
    sessions = [await server.login("alice") for _ in range(3)]
    bob_pair = await server.login("bob")
    request = auth_pb2.RevokeRequest(subject=str(alice.id))

    # Another subject's caller may not do it.
    await revoke_fails(
        server, request, bearer(bob_pair.access_token), Code.UNAUTHENTICATED, CALLER_REFUSED
    )
    await revoke_fails(server, request, None, Code.UNAUTHENTICATED, CALLER_REFUSED)
    for pair in sessions:
        await assert_live(server, pair)

    assert await revoke(server, request, bearer(sessions[0].access_token)) == 3
    for pair in sessions:
        await assert_dead(server, pair)
    # Bob is untouched.
    await assert_live(server, bob_pair)
    assert await refresh(server, bob_pair.refresh_token)

    # The caller's own token went with the rest, so it no longer authenticates.
    await revoke_fails(
        server,
        request,
        bearer(sessions[0].access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    # A fresh login, then log out everywhere again: only the new session is counted.
    fresh = await server.login("alice")
    assert await revoke(server, request, bearer(fresh.access_token)) == 1
    await assert_dead(server, fresh)
    # Bob cannot log Alice out, nor can Alice log Bob out.
    alice_again = await server.login("alice")
    await revoke_fails(
        server,
        auth_pb2.RevokeRequest(subject=str(bob.id)),
        bearer(alice_again.access_token),
        Code.UNAUTHENTICATED,
        CALLER_REFUSED,
    )
    await assert_live(server, bob_pair)


async def test_revoke_by_unknown_or_malformed_subject_is_not_allowed(server: LiveServer) -> None:
    await server.create_user("alice")
    pair = await server.login("alice")
    for subject in (str(uuid.uuid4()), "alice", "not-a-uuid"):
        await revoke_fails(
            server,
            auth_pb2.RevokeRequest(subject=subject),
            bearer(pair.access_token),
            Code.UNAUTHENTICATED,
            CALLER_REFUSED,
        )
    await assert_live(server, pair)


# 5. Disabled users and password changes


async def test_disabling_a_user_ends_every_session(server: LiveServer) -> None:
    await server.create_user("alice")
    await server.create_user("bob")
    alice_sessions = [await server.login("alice") for _ in range(2)]
    rotated = await refresh(server, alice_sessions[1].refresh_token)
    alice_sessions[1] = rotated
    bob_pair = await server.login("bob")
    users = server.running.components.users

    assert await users.set_disabled("alice", True) == 2
    for pair in alice_sessions:
        await assert_dead(server, pair)
    await assert_live(server, bob_pair)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("alice")
    assert_error(caught.value, Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")

    # Disabling again revokes nothing more.
    assert await users.set_disabled("alice", True) == 0

    # Enabled again: a new login works; the old sessions stay dead.
    assert await users.set_disabled("alice", False) == 0
    fresh = await server.login("alice")
    await assert_live(server, fresh)
    assert await refresh(server, fresh.refresh_token)
    for pair in alice_sessions:
        await assert_dead(server, pair)


async def test_password_change_ends_old_sessions_by_default(server: LiveServer) -> None:
    await server.create_user("alice")
    await server.create_user("bob")
    old = [await server.login("alice") for _ in range(2)]
    bob_pair = await server.login("bob")
    users = server.running.components.users

    await users.set_password("alice", NEW_PASSWORD, revoke_sessions=True)
    for pair in old:
        await assert_dead(server, pair)
    await assert_live(server, bob_pair)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("alice", password=PASSWORD)
    assert_error(caught.value, Code.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    fresh = await server.login("alice", password=NEW_PASSWORD)
    await assert_live(server, fresh)


async def test_password_change_without_revocation_keeps_sessions(server: LiveServer) -> None:
    await server.create_user("alice")
    old = await server.login("alice")
    users = server.running.components.users

    await users.set_password("alice", NEW_PASSWORD, revoke_sessions=False)
    await assert_live(server, old)
    rotated = await refresh(server, old.refresh_token)
    await assert_live(server, rotated)
    assert await session_revoked_at(server, old.session_id) is None
    fresh = await server.login("alice", password=NEW_PASSWORD)
    await assert_live(server, fresh)


async def test_a_login_checked_against_a_password_changed_meanwhile_starts_no_session(
    server: LiveServer,
) -> None:
    """The session is written only if the hash that was verified is still the user's:
    a password change (or a disable) during the slow hash check wins over the login."""
    import uuid as _uuid

    from service.clock import to_datetime
    from service.domain.records import NewSession, SecurityEvent

    user = await server.create_user("racer")
    old_hash = user.password_hash
    await server.running.components.users.set_password("racer", "a brand new password")
    now = to_datetime(server.clock.now())
    session = NewSession(
        id=_uuid.uuid4(),
        user_id=user.id,
        scopes=(),
        audience="a",
        created_at=now,
        expires_at=now,
        first_token_hash=bytes(32),
        first_token_expires_at=now,
        access_expires_at=now,
        peer=None,
        user_agent=None,
    )
    store = server.running.components.store
    created = await store.create_session(
        session, SecurityEvent(kind="login_succeeded"), verified_hash=old_hash, max_sessions=100
    )
    assert created is None
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0

    await server.running.components.users.set_disabled("racer", True)
    current = await server.pool.fetchval("SELECT password_hash FROM users WHERE id = $1", user.id)
    created = await store.create_session(
        session, SecurityEvent(kind="login_succeeded"), verified_hash=current, max_sessions=100
    )
    assert created is None


@pytest.mark.parametrize("change", ["disable", "set_password"])
async def test_a_user_change_cut_short_changes_nothing(server: LiveServer, change: str) -> None:
    """Disabling a user or changing a password, its event and the end of the user's
    sessions are one transaction: if any part fails, the user is as before and the
    sessions live on (never a disabled user, or a new password, with sessions still alive)."""
    await server.create_user("ursula")
    pair = await server.login("ursula")
    async with server.pool.acquire() as conn:
        await conn.execute(
            """CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
               CREATE TRIGGER refuse_event BEFORE INSERT ON security_events
               FOR EACH ROW WHEN (NEW.kind = 'sessions_revoked') EXECUTE FUNCTION refuse_event();"""
        )
    users = server.running.components.users
    attempt = (
        users.set_disabled("ursula", True)
        if change == "disable"
        else users.set_password("ursula", "an entirely new password")
    )
    with pytest.raises(asyncpg.RaiseError):
        await attempt
    async with server.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT disabled, password_hash FROM users")
        revoked = await conn.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
        kinds = await conn.fetch("SELECT kind FROM security_events")
    assert row is not None and not row["disabled"]
    assert revoked == 0
    assert {k["kind"] for k in kinds} == {
        "signing_key_created",
        "shared_settings_recorded",
        "user_created",
        "login_succeeded",
    }
    verdict = await server.stub.Validate(auth_pb2.ValidateRequest(access_token=pair.access_token))
    assert verdict.valid
    # The old password still logs in: the new hash was not kept either.
    assert (await server.login("ursula")).access_token
