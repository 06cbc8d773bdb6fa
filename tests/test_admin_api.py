"""AdminService over gRPC against the real server and PostgreSQL: users, passwords,
disabling and deleting, sessions, signing keys, the audit trail and caller auth."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import grpc
import jwt
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from service.domain.revocation import REVOCATION_MARGIN_SECONDS
from service.domain.signing_keys import KEY_ACTIVATION_DELAY
from service.settings import MAX_LEEWAY
from tests.helpers import assert_error, bad_request_fields, refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory

State = admin_pb2.SigningKeyState
NEW_PASSWORD = "a brand new passphrase"
OTHER_PASSWORD = "yet another passphrase"


def admin_stub(server: LiveServer) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(server.channel)


def by_name(username: str) -> admin_pb2.UserSelector:
    return admin_pb2.UserSelector(username=username)


def by_id(user_id: str) -> admin_pb2.UserSelector:
    return admin_pb2.UserSelector(user_id=user_id)


async def call_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error a call fails with (fails the test if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def invalid_fields(call: Awaitable[object]) -> list[str]:
    """The call must fail INVALID_ARGUMENT; the BadRequest field names."""
    error = await call_error(call)
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    return bad_request_fields(error)


def seconds(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def kid_of(token: str) -> str:
    kid = jwt.get_unverified_header(token)["kid"]
    assert isinstance(kid, str)
    return kid


async def jwks_kids(server: LiveServer) -> set[str]:
    response = await server.stub.GetJwks(auth_pb2.GetJwksRequest())
    return {key["kid"] for key in json.loads(response.jwks_json)["keys"]}


async def create(
    admin: admin_pb2_grpc.AdminServiceAsyncStub,
    username: str,
    password: str,
    scopes: tuple[str, ...] = (),
    metadata: tuple[tuple[str, str], ...] = (),
) -> admin_pb2.User:
    response = await admin.CreateUser(
        admin_pb2.CreateUserRequest(username=username, password=password, scopes=list(scopes)),
        metadata=metadata,
    )
    return response.user


async def login_fails(server: LiveServer, username: str, password: str) -> None:
    error = await call_error(server.login(username, password=password))
    assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def assert_session_dead(server: LiveServer, pair: auth_pb2.TokenPair) -> None:
    """Its access token no longer validates (REVOKED) and its refresh token is refused."""
    verdict = await validate(server, pair.access_token)
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
    await refresh_fails(server, pair.refresh_token, "SESSION_REVOKED")


async def assert_session_alive(server: LiveServer, pair: auth_pb2.TokenPair) -> None:
    verdict = await validate(server, pair.access_token)
    assert verdict.valid, verdict.error
    assert verdict.session_id == pair.session_id


async def live_session_ids(
    admin: admin_pb2_grpc.AdminServiceAsyncStub, user: admin_pb2.UserSelector
) -> list[str]:
    response = await admin.ListSessions(admin_pb2.ListSessionsRequest(user=user))
    return [s.session_id for s in response.sessions]


async def event_rows(server: LiveServer, kind: str) -> list[dict[str, object]]:
    rows = await server.pool.fetch(
        "SELECT subject, session_id, peer, detail FROM security_events WHERE kind = $1 ORDER BY id",
        kind,
    )
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]


# --- CreateUser ---------------------------------------------------------------------------


async def test_create_user_can_log_in_with_the_granted_scopes(
    server: LiveServer,
) -> None:
    admin = admin_stub(server)
    password = "created by the admin api"
    user = await create(admin, "ann", password, ("read", "write", "read"))
    assert user.username == "ann"
    assert list(user.scopes) == ["read", "write"]
    assert not user.disabled
    assert str(uuid.UUID(user.user_id)) == user.user_id
    assert seconds(user.created_at) == pytest.approx(server.clock.now(), abs=1e-3)

    both = await server.login("ann", password=password)
    assert set(both.scopes) == {"read", "write"}
    verdict = await validate(server, both.access_token, required_scopes=("read", "write"))
    assert verdict.valid
    assert verdict.subject == user.user_id
    narrow = await server.login("ann", password=password, scopes=("read",))
    assert list(narrow.scopes) == ["read"]
    error = await call_error(server.login("ann", password=password, scopes=("admin",)))
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_NOT_ALLOWED")
    await login_fails(server, "ann", "not the right password")


async def test_create_user_twice_is_already_exists(server: LiveServer) -> None:
    admin = admin_stub(server)
    first = await create(admin, "bob", "the first password")
    error = await call_error(create(admin, "bob", "the second password"))
    assert_error(error, grpc.StatusCode.ALREADY_EXISTS, "USER_ALREADY_EXISTS")
    # The first account is untouched.
    await server.login("bob", password="the first password")
    await login_fails(server, "bob", "the second password")
    count = await server.pool.fetchval("SELECT count(*) FROM users WHERE username = 'bob'")
    assert count == 1
    assert first.user_id == str(
        await server.pool.fetchval("SELECT id FROM users WHERE username = 'bob'")
    )


async def test_create_user_rejects_bad_arguments_with_field_names(server: LiveServer) -> None:
    admin = admin_stub(server)
    good = "long enough password"
    cases: list[tuple[admin_pb2.CreateUserRequest, list[str]]] = [
        (admin_pb2.CreateUserRequest(username="carl", password="seven77"), ["password"]),
        (admin_pb2.CreateUserRequest(username="carl", password=""), ["password"]),
        (admin_pb2.CreateUserRequest(username="", password=good), ["username"]),
        (admin_pb2.CreateUserRequest(username="ca\x00rl", password=good), ["username"]),
        (admin_pb2.CreateUserRequest(username="x" * 257, password=good), ["username"]),
        (
            admin_pb2.CreateUserRequest(username="carl", password=good, scopes=["ok", "bad one"]),
            ["scopes[1]"],
        ),
        (
            admin_pb2.CreateUserRequest(username="carl", password=good, scopes=['q"uote']),
            ["scopes[0]"],
        ),
        (
            admin_pb2.CreateUserRequest(username="", password="short"),
            ["username", "password"],
        ),
    ]
    for request, fields in cases:
        assert await invalid_fields(admin.CreateUser(request)) == fields, request
    # Exactly eight characters is enough.
    await create(admin, "carl", "8chars!!")
    assert await server.pool.fetchval("SELECT count(*) FROM users") == 1


async def test_passwords_never_reach_security_events_logs_or_errors(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = admin_stub(server)
    first = f"first-{uuid.uuid4().hex}"
    second = f"second-{uuid.uuid4().hex}"
    rejected = f"rejected-{uuid.uuid4().hex}"
    user = await create(admin, "dana", first, ("read",))
    await server.login("dana", password=first)
    await login_fails(server, "dana", rejected)
    duplicate = await call_error(create(admin, "dana", rejected))
    await admin.SetPassword(admin_pb2.SetPasswordRequest(user=by_id(user.user_id), password=second))
    await server.login("dana", password=second)
    short = await call_error(
        admin.SetPassword(admin_pb2.SetPasswordRequest(user=by_name("dana"), password="x\x00"))
    )

    rows = await server.pool.fetch("SELECT t::text AS row FROM security_events t")
    kinds = await server.pool.fetch("SELECT kind FROM security_events")
    assert {"user_created", "password_changed", "login_succeeded", "login_failed"} <= {
        r["kind"] for r in kinds
    }
    stored_hash = await server.pool.fetchval(
        "SELECT password_hash FROM users WHERE id = $1", uuid.UUID(user.user_id)
    )
    logged = caplog.text + "\n".join(repr(r.args) for r in caplog.records)
    shown = " ".join(
        f"{e.details()} {e.debug_error_string()} {e.trailing_metadata()}"
        for e in (duplicate, short)
    )
    for secret in (first, second, rejected, stored_hash):
        assert not any(secret in r["row"] for r in rows)
        assert secret not in logged
        assert secret not in shown


# --- SetPassword --------------------------------------------------------------------------


async def test_set_password_by_username_revokes_every_session(server: LiveServer) -> None:
    admin = admin_stub(server)
    old = "the old password"
    user = await create(admin, "erin", old)
    sessions = [await server.login("erin", password=old) for _ in range(2)]
    other = await create(admin, "frank", old)
    bystander = await server.login("frank", password=old)

    response = await admin.SetPassword(
        admin_pb2.SetPasswordRequest(user=by_name("erin"), password=NEW_PASSWORD)
    )
    assert response.revoked_sessions == 2
    for pair in sessions:
        await assert_session_dead(server, pair)
    await login_fails(server, "erin", old)
    fresh = await server.login("erin", password=NEW_PASSWORD)
    await assert_session_alive(server, fresh)
    assert await live_session_ids(admin, by_name("erin")) == [fresh.session_id]
    # Someone else's sessions and password are not touched.
    await assert_session_alive(server, bystander)
    await server.login("frank", password=old)
    assert other.user_id != user.user_id

    changed = await event_rows(server, "password_changed")
    assert [e["subject"] for e in changed] == [user.user_id]
    revoked = await event_rows(server, "sessions_revoked")
    assert [e["subject"] for e in revoked] == [user.user_id]
    assert revoked[0]["detail"] == {"reason": "password_changed", "actor": "admin:anonymous"}


async def test_set_password_by_user_id_can_keep_the_sessions(server: LiveServer) -> None:
    admin = admin_stub(server)
    old = "the old password"
    user = await create(admin, "gus", old)
    kept = await server.login("gus", password=old)

    response = await admin.SetPassword(
        admin_pb2.SetPasswordRequest(
            user=by_id(user.user_id), password=NEW_PASSWORD, keep_sessions=True
        )
    )
    assert response.revoked_sessions == 0
    await assert_session_alive(server, kept)
    rotated = await refresh(server, kept.refresh_token)
    await assert_session_alive(server, rotated)
    await login_fails(server, "gus", old)
    await server.login("gus", password=NEW_PASSWORD)
    assert await event_rows(server, "sessions_revoked") == []

    # And by id without keep_sessions: every session (the kept one and the new one) ends.
    response = await admin.SetPassword(
        admin_pb2.SetPasswordRequest(user=by_id(user.user_id), password=OTHER_PASSWORD)
    )
    assert response.revoked_sessions == 2
    await assert_session_dead(server, rotated)
    await login_fails(server, "gus", NEW_PASSWORD)
    await server.login("gus", password=OTHER_PASSWORD)


async def test_set_password_errors(server: LiveServer) -> None:
    admin = admin_stub(server)
    await create(admin, "hal", "hal's password")

    def request(
        user: admin_pb2.UserSelector | None, password: str = NEW_PASSWORD
    ) -> admin_pb2.SetPasswordRequest:
        if user is None:
            return admin_pb2.SetPasswordRequest(password=password)
        return admin_pb2.SetPasswordRequest(user=user, password=password)

    for unknown in (by_name("nobody"), by_id(str(uuid.uuid4()))):
        error = await call_error(admin.SetPassword(request(unknown)))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    assert await invalid_fields(admin.SetPassword(request(by_id("not-a-uuid")))) == ["user.user_id"]
    assert await invalid_fields(admin.SetPassword(request(by_id("")))) == ["user.user_id"]
    assert await invalid_fields(admin.SetPassword(request(by_name("")))) == ["user.username"]
    assert await invalid_fields(admin.SetPassword(request(None))) == ["user"]
    assert await invalid_fields(admin.SetPassword(request(admin_pb2.UserSelector()))) == ["user"]
    assert await invalid_fields(admin.SetPassword(request(by_name("hal"), "short"))) == ["password"]
    assert await invalid_fields(admin.SetPassword(request(None, ""))) == ["user", "password"]
    # Nothing changed.
    await server.login("hal", password="hal's password")
    assert await event_rows(server, "password_changed") == []


# --- DisableUser / EnableUser ---------------------------------------------------------------


async def test_disable_revokes_and_blocks_logins_until_enabled(server: LiveServer) -> None:
    admin = admin_stub(server)
    password = "ivy's password"
    user = await create(admin, "ivy", password)
    sessions = [await server.login("ivy", password=password) for _ in range(2)]

    disabled = await admin.DisableUser(admin_pb2.DisableUserRequest(user=by_name("ivy")))
    assert disabled.revoked_sessions == 2
    for pair in sessions:
        await assert_session_dead(server, pair)
    await login_fails(server, "ivy", password)
    assert await live_session_ids(admin, by_name("ivy")) == []
    assert await server.pool.fetchval(
        "SELECT disabled FROM users WHERE id = $1", uuid.UUID(user.user_id)
    )
    again = await admin.DisableUser(admin_pb2.DisableUserRequest(user=by_id(user.user_id)))
    assert again.revoked_sessions == 0

    await admin.EnableUser(admin_pb2.EnableUserRequest(user=by_id(user.user_id)))
    pair = await server.login("ivy", password=password)
    await assert_session_alive(server, pair)
    # Enabling does not bring the revoked sessions back.
    for old in sessions:
        verdict = await validate(server, old.access_token)
        assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
    assert await live_session_ids(admin, by_name("ivy")) == [pair.session_id]

    for call in (
        admin.DisableUser(admin_pb2.DisableUserRequest(user=by_name("nobody"))),
        admin.EnableUser(admin_pb2.EnableUserRequest(user=by_id(str(uuid.uuid4())))),
    ):
        assert_error(await call_error(call), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    assert await invalid_fields(admin.DisableUser(admin_pb2.DisableUserRequest())) == ["user"]
    assert await invalid_fields(
        admin.EnableUser(admin_pb2.EnableUserRequest(user=by_id("123")))
    ) == ["user.user_id"]


# --- DeleteUser ---------------------------------------------------------------------------


async def test_delete_user_revokes_frees_the_name_and_the_janitor_erases_it(
    server: LiveServer,
) -> None:
    admin = admin_stub(server)
    password = "jay's password"
    old = await create(admin, "jay", password, ("read",))
    old_id = uuid.UUID(old.user_id)
    sessions = [await server.login("jay", password=password) for _ in range(2)]

    deleted = await admin.DeleteUser(admin_pb2.DeleteUserRequest(user=by_name("jay")))
    assert deleted.revoked_sessions == 2
    for pair in sessions:
        await assert_session_dead(server, pair)
    await login_fails(server, "jay", password)
    for selector in (by_id(old.user_id), by_name("jay")):
        error = await call_error(admin.ListSessions(admin_pb2.ListSessionsRequest(user=selector)))
        assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    error = await call_error(admin.DeleteUser(admin_pb2.DeleteUserRequest(user=by_id(old.user_id))))
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")

    # The name is free at once, for a different user.
    new = await create(admin, "jay", OTHER_PASSWORD)
    assert new.user_id != old.user_id
    current = await server.login("jay", password=OTHER_PASSWORD)
    assert (await validate(server, current.access_token)).subject == new.user_id
    await login_fails(server, "jay", password)
    assert await live_session_ids(admin, by_name("jay")) == [current.session_id]
    error = await call_error(
        admin.ListSessions(admin_pb2.ListSessionsRequest(user=by_id(old.user_id)))
    )
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")

    janitor = server.running.components.janitor
    sql_sessions = "SELECT count(*) FROM sessions WHERE user_id = $1"
    sql_user = "SELECT count(*) FROM users WHERE id = $1"
    # Not yet: the old tokens may still be alive, so their revocations must be kept.
    await janitor.run_once()
    assert await server.pool.fetchval(sql_user, old_id) == 1
    assert await server.pool.fetchval(sql_sessions, old_id) == 2

    settings = server.settings
    server.clock.advance(settings.access_ttl + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS + 1)
    await janitor.run_once()
    assert await server.pool.fetchval(sql_user, old_id) == 0
    assert await server.pool.fetchval(sql_sessions, old_id) == 0
    orphans = await server.pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE session_id = ANY($1::uuid[])",
        [uuid.UUID(p.session_id) for p in sessions],
    )
    assert orphans == 0
    # The new "jay" and their live session stay.
    assert await server.pool.fetchval(sql_user, uuid.UUID(new.user_id)) == 1
    assert await server.pool.fetchval(sql_sessions, uuid.UUID(new.user_id)) == 1
    await refresh(server, current.refresh_token)


# --- ListSessions -------------------------------------------------------------------------


async def test_list_sessions_shows_live_sessions_newest_first_with_details(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(audiences=frozenset({"orders"}))
    admin = admin_stub(server)
    clock = server.clock
    settings = server.settings
    password = "kay's password"
    user = await create(admin, "kay", password, ("read", "write"))
    expired = await server.login("kay", password=password)
    clock.advance(settings.refresh_idle_ttl - 10)
    first = await server.login("kay", password=password, scopes=("read",), audience="orders")
    first_at = clock.now()
    clock.advance(1)
    revoked = await server.login("kay", password=password)
    clock.advance(1)
    last = await server.login("kay", password=password)
    last_at = clock.now()
    assert (
        await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=revoked.session_id))
    ).revoked_sessions == 1
    clock.advance(10)  # the first login's refresh token is now past its idle lifetime
    await refresh_fails(server, expired.refresh_token, "REFRESH_TOKEN_EXPIRED")
    rotated = await refresh(server, first.refresh_token)
    refreshed_at = clock.now()

    listed = await admin.ListSessions(admin_pb2.ListSessionsRequest(user=by_name("kay")))
    assert listed.next_page_token == ""
    assert [s.session_id for s in listed.sessions] == [last.session_id, first.session_id]
    newest, older = listed.sessions
    for session, created in ((newest, last_at), (older, first_at)):
        assert session.user_id == user.user_id
        assert seconds(session.created_at) == pytest.approx(created, abs=1e-3)
        assert seconds(session.expires_at) == pytest.approx(
            created + settings.refresh_absolute_ttl, abs=1e-3
        )
        assert session.peer, "the peer seen at login"
        assert "127.0.0.1" in session.peer
        assert "grpc" in session.user_agent.lower()
    assert not newest.HasField("last_refreshed_at")
    assert older.HasField("last_refreshed_at")
    assert seconds(older.last_refreshed_at) == pytest.approx(refreshed_at, abs=1e-3)
    assert list(newest.scopes) == ["read", "write"]
    assert list(older.scopes) == ["read"]
    assert newest.audience == settings.audience
    assert older.audience == "orders"
    assert rotated.session_id == older.session_id
    # By id, the same answer.
    assert await live_session_ids(admin, by_id(user.user_id)) == [
        last.session_id,
        first.session_id,
    ]


async def test_list_sessions_pages_without_gaps_or_duplicates(server: LiveServer) -> None:
    admin = admin_stub(server)
    password = "lou's password"
    await create(admin, "lou", password)
    created: list[str] = []
    # Three at the same instant (ties broken by id), then two later ones.
    for step in (0, 0, 0, 1, 1):
        server.clock.advance(step)
        created.append((await server.login("lou", password=password)).session_id)

    pages: list[list[admin_pb2.Session]] = []
    token = ""
    while True:
        page = await admin.ListSessions(
            admin_pb2.ListSessionsRequest(user=by_name("lou"), page_size=2, page_token=token)
        )
        pages.append(list(page.sessions))
        token = page.next_page_token
        if not token:
            break
        assert len(pages) < 5, "pagination does not end"
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [s for p in pages for s in p]
    ids = [s.session_id for s in listed]
    assert len(set(ids)) == 5
    assert set(ids) == set(created)
    starts = [seconds(s.created_at) for s in listed]
    assert starts == sorted(starts, reverse=True)
    assert ids[:2] == [created[4], created[3]]

    # One page that holds them all, and the default size, end at once.
    for size in (5, 0, 100):
        whole = await admin.ListSessions(
            admin_pb2.ListSessionsRequest(user=by_name("lou"), page_size=size)
        )
        assert [s.session_id for s in whole.sessions] == ids
        assert whole.next_page_token == ""


async def test_list_sessions_rejects_bad_page_arguments(server: LiveServer) -> None:
    admin = admin_stub(server)
    password = "mo's password"
    await create(admin, "mo", password)
    await server.login("mo", password=password)
    user = by_name("mo")

    for size in (101, -1, 1_000_000):
        fields = await invalid_fields(
            admin.ListSessions(admin_pb2.ListSessionsRequest(user=user, page_size=size))
        )
        assert fields == ["page_size"], size
    for token in ("garbage", "!!!", "bm90LWEtdG9rZW4", "MTIzL25vdC1hLXV1aWQ", "é", "x" * 300):
        fields = await invalid_fields(
            admin.ListSessions(admin_pb2.ListSessionsRequest(user=user, page_token=token))
        )
        assert fields == ["page_token"], token
    assert await invalid_fields(admin.ListSessions(admin_pb2.ListSessionsRequest())) == ["user"]
    error = await call_error(
        admin.ListSessions(admin_pb2.ListSessionsRequest(user=by_name("nobody")))
    )
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


# --- RevokeSession ------------------------------------------------------------------------


async def test_revoke_session_ends_anyones_session(server: LiveServer) -> None:
    admin = admin_stub(server)
    password = "ned's password"
    await create(admin, "ned", password)
    await create(admin, "ola", password)
    target = await server.login("ned", password=password)
    sibling = await server.login("ned", password=password)
    bystander = await server.login("ola", password=password)

    first = await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=target.session_id))
    assert first.revoked_sessions == 1
    await assert_session_dead(server, target)
    await assert_session_alive(server, sibling)
    await assert_session_alive(server, bystander)
    assert await live_session_ids(admin, by_name("ned")) == [sibling.session_id]

    second = await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=target.session_id))
    assert second.revoked_sessions == 0

    error = await call_error(
        admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=str(uuid.uuid4())))
    )
    assert_error(error, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    for bad in ("not-a-uuid", "", "1234"):
        fields = await invalid_fields(
            admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=bad))
        )
        assert fields == ["session_id"], bad
    await assert_session_alive(server, sibling)


async def test_revoking_an_already_revoked_session_is_still_recorded(server: LiveServer) -> None:
    """The admin API records every call: a RevokeSession that finds the session already
    revoked is an operator's action too and must leave a trace."""
    admin = admin_stub(server)
    password = "pia's password"
    await create(admin, "pia", password)
    pair = await server.login("pia", password=password)
    for expected in (1, 0):
        response = await admin.RevokeSession(
            admin_pb2.RevokeSessionRequest(session_id=pair.session_id)
        )
        assert response.revoked_sessions == expected
    recorded = [
        e
        for e in await event_rows(server, "session_revoked")
        if e["detail"].get("actor") == "admin:anonymous"  # type: ignore[attr-defined]
    ]
    assert len(recorded) == 2, "the second RevokeSession call left no security event"


# --- Signing keys -------------------------------------------------------------------------


async def test_rotate_and_list_signing_keys(server: LiveServer) -> None:
    admin = admin_stub(server)
    clock = server.clock
    initial = await admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest())
    assert [k.state for k in initial.keys] == [State.SIGNING_KEY_STATE_ACTIVE]
    old_kid = initial.keys[0].kid
    await create(admin, "quinn", "quinn's password")
    before = await server.login("quinn", password="quinn's password")
    assert kid_of(before.access_token) == old_kid

    clock.advance(1)
    rotated = (await admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest())).key
    assert rotated.kid != old_kid
    assert rotated.state == State.SIGNING_KEY_STATE_PENDING
    assert rotated.alg == initial.keys[0].alg
    assert seconds(rotated.created_at) == pytest.approx(clock.now(), abs=1e-3)
    assert seconds(rotated.activates_at) == pytest.approx(
        clock.now() + KEY_ACTIVATION_DELAY, abs=1e-3
    )
    assert not rotated.HasField("retires_at")
    assert not rotated.HasField("retired_at")

    listed = (await admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest())).keys
    assert [(k.kid, k.state) for k in listed] == [
        (rotated.kid, State.SIGNING_KEY_STATE_PENDING),
        (old_kid, State.SIGNING_KEY_STATE_ACTIVE),
    ]
    assert not listed[1].HasField("retires_at")
    assert await jwks_kids(server) == {old_kid, rotated.kid}

    clock.advance(1)
    listed = (await admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest())).keys
    assert [(k.kid, k.state) for k in listed] == [
        (rotated.kid, State.SIGNING_KEY_STATE_ACTIVE),
        (old_kid, State.SIGNING_KEY_STATE_SUPERSEDED),
    ]
    old = listed[1]
    assert old.HasField("retires_at")
    assert not old.HasField("retired_at")
    settings = server.settings
    keep = settings.access_ttl + settings.leeway + REVOCATION_MARGIN_SECONDS
    assert seconds(old.retires_at) == pytest.approx(seconds(rotated.activates_at) + keep, abs=1e-3)
    assert await jwks_kids(server) == {old_kid, rotated.kid}
    after = await server.login("quinn", password="quinn's password")
    assert kid_of(after.access_token) == rotated.kid
    await assert_session_alive(server, before)
    await assert_session_alive(server, after)

    created = await event_rows(server, "signing_key_created")
    assert [e["detail"] for e in created][-1] == {
        "kid": rotated.kid,
        "alg": rotated.alg,
        "reason": "admin",
        "actor": "admin:anonymous",
    }


# --- The audit trail ----------------------------------------------------------------------


async def test_every_admin_call_is_a_security_event_with_its_actor(server: LiveServer) -> None:
    admin = admin_stub(server)
    password = "rae's password"
    user = await create(admin, "rae", password)
    pair = await server.login("rae", password=password)
    await admin.ListSessions(admin_pb2.ListSessionsRequest(user=by_id(user.user_id)))
    await admin.RevokeSession(admin_pb2.RevokeSessionRequest(session_id=pair.session_id))
    await admin.SetPassword(
        admin_pb2.SetPasswordRequest(user=by_name("rae"), password=NEW_PASSWORD)
    )
    await admin.DisableUser(admin_pb2.DisableUserRequest(user=by_name("rae")))
    await admin.EnableUser(admin_pb2.EnableUserRequest(user=by_name("rae")))
    await admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest())
    await admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest())
    await admin.DeleteUser(admin_pb2.DeleteUserRequest(user=by_id(user.user_id)))

    rows = await server.pool.fetch(
        """SELECT kind, subject, session_id, peer, detail->>'actor' AS actor
             FROM security_events WHERE detail ? 'actor' ORDER BY id"""
    )
    assert {r["actor"] for r in rows} == {"admin:anonymous"}
    by_kind = {r["kind"]: r for r in rows}
    # In the order they were made in.
    made = [
        "user_created",
        "sessions_listed",
        "session_revoked",
        "password_changed",
        "user_disabled",
        "user_enabled",
        "signing_key_created",
        "signing_keys_listed",
        "user_deleted",
    ]
    expected = set(made)
    assert expected <= set(by_kind), expected - set(by_kind)
    for kind in expected - {"session_revoked", "signing_key_created", "signing_keys_listed"}:
        assert by_kind[kind]["subject"] == user.user_id, kind
    assert str(by_kind["session_revoked"]["session_id"]) == pair.session_id
    for kind in expected:
        assert by_kind[kind]["peer"], kind
    assert [r["kind"] for r in rows if r["kind"] in expected] == made


# --- Caller authentication ----------------------------------------------------------------


async def test_admin_calls_need_an_admin_service_token(
    server_factory: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ops_secret = secrets.token_urlsafe(30)
    reader_secret = secrets.token_urlsafe(30)
    assert len(ops_secret) == len(reader_secret) == 40
    tokens_file = tmp_path / "service-tokens"
    tokens_file.write_text(
        "# name groups credential\n"
        f"ops admin token:{ops_secret}\n"
        f"reader validate token:{reader_secret}\n"
    )
    server = await server_factory(caller_auth=frozenset({"admin"}), service_tokens_file=tokens_file)
    admin = admin_stub(server)
    ops = (("authorization", f"Bearer {ops_secret}"),)
    reader = (("authorization", f"Bearer {reader_secret}"),)
    stranger = (("authorization", f"Bearer {secrets.token_urlsafe(30)}"),)
    password = "sam's password"

    for metadata in ((), stranger):
        error = await call_error(create(admin, "sam", password, metadata=metadata))
        assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
        error = await call_error(
            admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest(), metadata=metadata)
        )
        assert_error(error, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED")
    error = await call_error(create(admin, "sam", password, metadata=reader))
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_PERMITTED")
    error = await call_error(
        admin.RotateSigningKey(admin_pb2.RotateSigningKeyRequest(), metadata=reader)
    )
    assert_error(error, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_NOT_PERMITTED")
    # The refused calls did nothing.
    assert await server.pool.fetchval("SELECT count(*) FROM users") == 0
    assert await server.pool.fetchval("SELECT count(*) FROM signing_keys") == 1

    user = await create(admin, "sam", password, ("read",), metadata=ops)
    keys = await admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest(), metadata=ops)
    assert len(keys.keys) == 1
    actors = await server.pool.fetch(
        """SELECT kind, subject, detail->>'actor' AS actor FROM security_events
            WHERE kind IN ('user_created', 'signing_keys_listed') ORDER BY id"""
    )
    assert [(r["kind"], r["actor"]) for r in actors] == [
        ("user_created", "admin:ops"),
        ("signing_keys_listed", "admin:ops"),
    ]
    assert actors[0]["subject"] == user.user_id

    # End users' calls stay open: no token needed.
    pair = await server.login("sam", password=password)
    assert (await validate(server, pair.access_token)).valid
    rotated = await refresh(server, pair.refresh_token)
    assert rotated.session_id == pair.session_id
    assert await jwks_kids(server) == {keys.keys[0].kid}

    for secret in (ops_secret, reader_secret):
        assert secret not in caplog.text

    # The refused calls are security events too, naming the known service if there was one
    # (written in the background: the refusal does not wait for the database), one row
    # per actor, method, reason and address, counted.
    async def refused_so_far() -> int:
        total: int = await server.pool.fetchval(
            """SELECT coalesce(sum(occurrences), 0) FROM security_events
                WHERE kind = 'admin_call_refused'"""
        )
        return total

    deadline = time.monotonic() + 5
    while await refused_so_far() < 6:
        assert time.monotonic() < deadline, "the refused calls were not recorded"
        await asyncio.sleep(0.02)
    refused = await server.pool.fetch(
        """SELECT detail->>'method' AS method, detail->>'reason' AS reason,
                  detail->>'actor' AS actor, peer, occurrences
             FROM security_events WHERE kind = 'admin_call_refused' ORDER BY id"""
    )
    # Written in the background: compared without their order.
    assert sorted((r["method"], r["reason"], r["actor"], r["occurrences"]) for r in refused) == [
        ("CreateUser", "SERVICE_CREDENTIALS_REQUIRED", "admin:unauthenticated", 2),
        ("CreateUser", "SERVICE_NOT_PERMITTED", "admin:reader", 1),
        ("ListSigningKeys", "SERVICE_CREDENTIALS_REQUIRED", "admin:unauthenticated", 2),
        ("RotateSigningKey", "SERVICE_NOT_PERMITTED", "admin:reader", 1),
    ]
    assert all(r["peer"] for r in refused)
    # A flood of refused calls is counted in full but adds no rows (and few writes).
    for _ in range(60):
        await call_error(
            admin.ListSigningKeys(admin_pb2.ListSigningKeysRequest(), metadata=stranger)
        )
    deadline = time.monotonic() + 5
    while await refused_so_far() < 66:
        assert time.monotonic() < deadline, "the flood was not counted"
        await asyncio.sleep(0.05)
    rows = await server.pool.fetchval(
        "SELECT count(*) FROM security_events WHERE kind = 'admin_call_refused'"
    )
    assert rows == len(refused)
    assert await refused_so_far() == 66
    # And logged once per source and window, not once per call.
    lines = [r for r in caplog.records if "ListSigningKeys refused" in r.getMessage()]
    assert len(lines) == 1


async def test_refused_admin_calls_are_security_events(server: LiveServer) -> None:
    """An audit trail that only shows what succeeded would hide the probing before it."""
    admin = admin_stub(server)
    error = await call_error(
        admin.DisableUser(
            admin_pb2.DisableUserRequest(user=admin_pb2.UserSelector(username="nobody"))
        )
    )
    assert_error(error, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    error = await call_error(create(admin, "", "short"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = await server.pool.fetch(
        """SELECT detail->>'method' AS method, detail->>'reason' AS reason,
                  detail->>'actor' AS actor
             FROM security_events WHERE kind = 'admin_call_refused' ORDER BY id"""
    )
    assert [(r["method"], r["reason"], r["actor"]) for r in refused] == [
        ("DisableUser", "USER_NOT_FOUND", "admin:anonymous"),
        ("CreateUser", "INVALID_ARGUMENT", "admin:anonymous"),
    ]


async def test_undecodable_admin_requests_are_refused_and_recorded(server: LiveServer) -> None:
    """A request that does not parse is refused before the method runs, and is recorded
    like every other refused admin call (probing with broken bytes leaves a trail too)."""
    raw = server.channel.unary_unary(
        "/auth.v1.AdminService/CreateUser",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\x0a\x02\xff\xfe", timeout=10)  # username not UTF-8
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(caught.value) == ["request"]
    refused = await server.pool.fetch(
        """SELECT detail->>'method' AS method, detail->>'reason' AS reason
             FROM security_events WHERE kind = 'admin_call_refused'"""
    )
    assert [(r["method"], r["reason"]) for r in refused] == [("CreateUser", "INVALID_ARGUMENT")]
    assert await server.pool.fetchval("SELECT count(*) FROM users") == 0
