"""Client-chosen text that ends up stored or shown: metadata (user agent, authorization)
sent raw over HTTP/2 with bytes no gRPC client sends, NUL in every string field of every
request, and usernames (one account per canonical name, no control characters)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from service.domain.usernames import escape_text, new_username_problem, username_key
from service.store import apply_migrations
from service.store.migrations import Migration, load_migrations
from tests.helpers import assert_error, bad_request_fields, status_detail, validate
from tests.live_server import PASSWORD, TEST_KEK, LiveServer, ServerFactory, database_uri
from tests.raw_http2 import raw_unary_call

ISSUE = "/auth.v1.AuthService/Issue"
SERVER_FAILURES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def _issue_request(username: str) -> bytes:
    return auth_pb2.IssueRequest(
        password=auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
    ).SerializeToString()


async def _stored_user_agents(server: LiveServer) -> list[str | None]:
    rows = await server.pool.fetch("SELECT user_agent FROM sessions ORDER BY created_at")
    return [r["user_agent"] for r in rows]


# Metadata


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (b"evil\x00agent", "evil\\x00agent"),
        (b"forged\nline\r\x1b[31mred", "forged\\nline\\r\\x1b[31mred"),
        (b"back\\slash\x7f", "back\\\\slash\\x7f"),
    ],
)
async def test_user_agent_with_nul_or_control_characters_is_stored_escaped(
    server: LiveServer, sent: bytes, stored: str
) -> None:
    await server.create_user("alice")
    response = await raw_unary_call(
        server.running.port, ISSUE, _issue_request("alice"), [(b"user-agent", sent)]
    )
    assert response.grpc_status == grpc.StatusCode.OK.value[0]
    assert response.message is not None
    tokens = auth_pb2.IssueResponse.FromString(response.message).tokens
    assert await _stored_user_agents(server) == [stored]
    # What the admin API lists is the stored, escaped text.
    admin = admin_pb2_grpc.AdminServiceStub(server.channel)
    listed = await admin.ListSessions(
        admin_pb2.ListSessionsRequest(user=admin_pb2.UserSelector(username="alice"))
    )
    assert [(s.session_id, s.user_agent) for s in listed.sessions] == [(tokens.session_id, stored)]


async def test_very_long_user_agent_is_stored_capped_and_escaped(server: LiveServer) -> None:
    await server.create_user("alice")
    response = await raw_unary_call(
        server.running.port, ISSUE, _issue_request("alice"), [(b"user-agent", b"\x01" * 5000)]
    )
    assert response.grpc_status == grpc.StatusCode.OK.value[0]
    (stored,) = await _stored_user_agents(server)
    assert stored is not None
    # 64 whole escapes of four characters: capped at 256, never cut inside an escape.
    assert stored == "\\x01" * 64


@pytest.mark.parametrize("credential", [b"Bearer a\x00b", b"Bearer \x1b[2J", b"Bearer \xff"])
async def test_authorization_with_nul_or_control_bytes_is_refused_cleanly(
    server_factory: ServerFactory, tmp_path: Path, credential: bytes
) -> None:
    tokens_file = tmp_path / "services"
    tokens_file.write_text(f"ops admin,validate token:{'s' * 40}\n")
    server = await server_factory(
        caller_auth=frozenset({"admin", "validate"}), service_tokens_file=tokens_file
    )
    user = await server.create_user("alice")
    calls = [
        # An end user's token for Revoke by subject, a service token for the guarded calls.
        (
            "/auth.v1.AuthService/Revoke",
            auth_pb2.RevokeRequest(subject=str(user.id)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "/auth.v1.AuthService/Validate",
            auth_pb2.ValidateRequest(access_token="x"),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "/auth.v1.AdminService/ListSigningKeys",
            admin_pb2.ListSigningKeysRequest(),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ]
    for method, request, code in calls:
        response = await raw_unary_call(
            server.running.port,
            method,
            request.SerializeToString(),
            [(b"authorization", credential), (b"user-agent", b"x\x00y")],
        )
        assert response.grpc_status == code.value[0], method


# NUL in every string field of every request


def _string_fields(
    descriptor: Descriptor, parents: tuple[str, ...] = ()
) -> Iterator[tuple[str, list[str]]]:
    """(BadRequest field name, attribute path) of every string field, nested ones too."""
    for field in descriptor.fields:
        path = (*parents, field.name)
        if field.type == FieldDescriptor.TYPE_STRING:
            repeated = field.is_repeated
            yield ".".join(path) + ("[0]" if repeated else ""), list(path)
        elif field.message_type is not None and field.message_type.full_name.startswith("auth.v1."):
            yield from _string_fields(field.message_type, path)


def _with_nul(message_class: type[Message], path: list[str]) -> Message:
    request = message_class()
    target = request
    for part in path[:-1]:
        target = getattr(target, part)
    field = target.DESCRIPTOR.fields_by_name[path[-1]]
    if field.is_repeated:
        getattr(target, path[-1]).append("a\x00b")
    else:
        setattr(target, path[-1], "a\x00b")
    return request


def _request_string_fields() -> Iterator[tuple[str, str, list[str]]]:
    for file in (auth_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            method: MethodDescriptor
            for method in service.methods:
                for field, path in _string_fields(method.input_type):
                    yield f"/{service.full_name}/{method.name}", field, path


REQUEST_STRING_FIELDS = list(_request_string_fields())


def test_every_request_string_field_is_covered() -> None:
    # The sweep below walks the descriptors; make sure it finds what it should.
    found = {(method.rsplit("/", 1)[1], field) for method, field, _ in REQUEST_STRING_FIELDS}
    assert {
        ("Issue", "password.username"),
        ("Issue", "scopes[0]"),
        ("Revoke", "subject"),
        ("CreateUser", "username"),
        ("SetPassword", "user.username"),
        ("ListSessions", "page_token"),
    } <= found
    assert len(found) >= 20


@pytest.mark.parametrize(
    ("method", "field", "path"),
    REQUEST_STRING_FIELDS,
    ids=[f"{m.rsplit('/', 1)[1]}.{f}" for m, f, _ in REQUEST_STRING_FIELDS],
)
async def test_nul_in_any_request_string_field_is_invalid_argument_naming_it(
    server: LiveServer, method: str, field: str, path: list[str]
) -> None:
    service_name, method_name = method.strip("/").split("/")
    file = auth_pb2 if service_name == "auth.v1.AuthService" else admin_pb2
    method_descriptor = file.DESCRIPTOR.services_by_name[service_name.split(".")[-1]]
    input_type = method_descriptor.methods_by_name[method_name].input_type
    request_class = getattr(file, input_type.name)
    request = _with_nul(request_class, path)
    call: grpc.aio.UnaryUnaryMultiCallable[Message, bytes] = server.channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    error = caught.value
    assert error.code() not in SERVER_FAILURES, (error.code(), error.details())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    violations = status_detail(error, error_details_pb2.BadRequest).field_violations
    assert field in [v.field for v in violations]


# Usernames


def _admin(server: LiveServer) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(server.channel)


async def _create(server: LiveServer, username: str) -> admin_pb2.User:
    response = await _admin(server).CreateUser(
        admin_pb2.CreateUserRequest(username=username, password=PASSWORD)
    )
    return response.user


async def _subject_of_login(server: LiveServer, username: str) -> str:
    pair = await server.login(username)
    verdict = await validate(server, pair.access_token)
    assert verdict.valid
    return verdict.subject


async def test_case_and_width_variants_of_a_username_are_one_account(
    server: LiveServer,
) -> None:
    alice = await _create(server, "alice")
    for variant in ["Alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45", "\uff21lice"]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _create(server, variant)
        assert_error(caught.value, grpc.StatusCode.ALREADY_EXISTS, "USER_ALREADY_EXISTS")
        # ... and the one account logs in under every form of its name.
        assert await _subject_of_login(server, variant) == alice.user_id
    # The admin API finds it under any form too.
    admin = _admin(server)
    await admin.DisableUser(
        admin_pb2.DisableUserRequest(user=admin_pb2.UserSelector(username="ALICE"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("alice")
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")

    # The name is kept as it was written, for display.
    bob = await _create(server, "Bob")
    assert bob.username == "Bob"
    assert await _subject_of_login(server, "bob") == bob.user_id
    users = await server.running.components.users.list()
    assert sorted(u.username for u in users) == ["Bob", "alice"]


async def test_a_deleted_name_is_free_again_in_any_form(server: LiveServer) -> None:
    carol = await _create(server, "carol")
    await _admin(server).DeleteUser(
        admin_pb2.DeleteUserRequest(user=admin_pb2.UserSelector(username="CAROL"))
    )
    again = await _create(server, "Carol")
    assert again.user_id != carol.user_id
    assert await _subject_of_login(server, "carol") == again.user_id


@pytest.mark.parametrize(
    "username",
    [
        "eve\nroot\tactive",  # a forged line of `authsvc users list`
        "\x1b[2Jeve",  # an ANSI escape: clears the operator's screen
        "eve\x7f",
        "eve\u200b",  # zero-width space (format)
        "\u202eeve",  # right-to-left override (format)
        "eve\u2028x",  # line separator
        "eve\ue000",  # private use
        "eve\u0378",  # unassigned
        " eve",
        "eve\u3000",  # ideographic space at the end
        "\u00a8eve",  # NFKC: a space and a combining diaeresis, so the key starts blank
        "\u3164",  # Hangul filler: a letter that shows as nothing
        "ev\u2800e",  # blank braille cell
        "x\u115fy",  # Hangul choseong filler
        "\ufdfa" * 80,  # 240 bytes, but over 2 KB once normalised
    ],
)
async def test_usernames_with_control_invisible_or_blank_edges_are_refused(
    server: LiveServer, username: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(server, username)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(caught.value) == ["username"]
    assert await server.running.components.users.list() == []


async def test_a_username_too_long_once_normalised_is_invalid_argument_at_login(
    server: LiveServer,
) -> None:
    # 255 bytes on the wire, about 2.8 KB once normalised: too long for the throttle's and
    # the users' indexes, so refused before it gets there (not INTERNAL).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("\ufdfa" * 85)
    assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert bad_request_fields(caught.value) == ["password.username"]


async def test_varying_the_case_of_a_username_shares_its_login_throttle(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(throttle_user_failures=2, throttle_peer_failures=100)
    await server.create_user("victim")
    for name in ["victim", "Victim", "VICTIM"]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.login(name, password="not the password")
        assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    # The third failure counted against one key: every form of the name now waits.
    for name in ["vIcTiM", "\uff56ictim"]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.login(name)
        assert_error(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED")


# Pure functions


def test_username_key_folds_case_and_compatibility_forms() -> None:
    assert username_key("Alice") == username_key("ALICE") == "alice"
    assert username_key("\uff41\uff4c\uff49\uff43\uff45") == "alice"  # full-width
    assert username_key("Stra\u00dfe") == username_key("STRASSE")  # casefold, not lower
    assert username_key("e\u0301") == username_key("\u00e9")  # composed or not
    assert username_key("\u2160") == "i"  # Roman numeral one
    assert username_key("alice") != username_key("alice2")


def test_new_username_problem_accepts_ordinary_names() -> None:
    for name in ["alice", "Zo\u00eb", "\u5c71\u7530", "mary ann", "o'neil", "a.b-c_d@example"]:
        assert new_username_problem(name) is None, name


def test_escape_text_shows_hidden_characters_as_escapes() -> None:
    assert escape_text("a\nb\tc\x1b[0m") == "a\\nb\\tc\\x1b[0m"
    assert escape_text("x\u200by\u202e") == "x\\u200by\\u202e"
    assert escape_text("back\\slash") == "back\\\\slash"
    assert escape_text("caf\u00e9 \u5c71") == "caf\u00e9 \u5c71"  # printable text unchanged
    assert escape_text("\x00" * 10, limit=9) == "\\x00\\x00"  # never half an escape


# The CLI prints user-chosen text escaped


def _authsvc(database_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    env.update(
        AUTH_DATABASE_URL=database_url,
        AUTH_DATA_DIR=str(tmp_path / "data"),
        AUTH_KEK=base64.b64encode(TEST_KEK).decode(),
        AUTH_LISTEN="127.0.0.1:0",
    )
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def _insert_user_bypassing_checks(
    conn: asyncpg.Connection, username: str, *, key: bool = True, deleted: bool = False
) -> uuid.UUID:
    """A user row as an older version could have written it (no name rules then)."""
    user_id = uuid.uuid4()
    now = datetime.now(UTC)
    columns = "id, username, password_hash, created_at, updated_at, deleted_at"
    values = [user_id, username, "!", now, now, now if deleted else None]
    if key:  # the schema has the column
        columns += ", username_key"
        values.append(username_key(username))
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await conn.execute(f"INSERT INTO users ({columns}) VALUES ({placeholders})", *values)
    return user_id


@pytest.mark.system
async def test_cli_prints_usernames_and_event_text_escaped(
    database_url: str, tmp_path: Path
) -> None:
    forged = "eve\nroot\t00000000-0000-0000-0000-000000000000\tactive\tadmin"
    conn = await asyncpg.connect(database_url)
    try:
        await _insert_user_bypassing_checks(conn, forged)
        await _insert_user_bypassing_checks(conn, "\x1b[2J\x1b[Hmallory")
        await conn.execute(
            "INSERT INTO security_events (occurred_at, kind, subject, peer, detail)"
            " VALUES ($1, 'login_failed', $2, $3, '{}')",
            datetime.now(UTC),
            "sub\x1b[31m",
            "ipv4:1.2.3.4\nforged",
        )
    finally:
        await conn.close()

    listed = _authsvc(database_url, tmp_path, "users", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2, listed.stdout  # one line per user, none forged
    assert "\x1b" not in listed.stdout
    assert any(line.startswith("eve\\nroot\\t00000000") for line in lines)
    assert any(line.startswith("\\x1b[2J\\x1b[Hmallory\t") for line in lines)
    # Each line still has its four tab-separated columns.
    assert all(len(line.split("\t")) == 4 for line in lines)

    events = _authsvc(database_url, tmp_path, "events", "--since", "1h")
    assert events.returncode == 0, events.stderr
    assert "\x1b" not in events.stdout
    (line,) = [line for line in events.stdout.splitlines() if "login_failed" in line]
    assert "subject=sub\\x1b[31m" in line and "peer=ipv4:1.2.3.4\\nforged" in line

    # And the CLI refuses such a name, as the API does.
    created = _authsvc(database_url, tmp_path, "users", "create", "a\nb", "--password-stdin")
    assert created.returncode != 0
    assert "username must not contain control" in created.stderr


# The migration that introduces username keys


def _migrations_before_username_keys() -> list[Migration]:
    migrations = load_migrations()
    (keys,) = [m for m in migrations if m.name.endswith("_username_keys.sql")]
    return [m for m in migrations if m.version < keys.version]


@pytest.fixture
async def old_schema_database_url(pg_admin_uri: str) -> AsyncIterator[str]:
    """A database migrated only up to the version before usernames had keys."""
    name = f"t_old_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_uri)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_uri(pg_admin_uri, name)
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn, _migrations_before_username_keys())
    finally:
        await conn.close()
    yield url
    admin = await asyncpg.connect(pg_admin_uri)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.system
async def test_start_up_refuses_when_existing_usernames_collide_then_migrates_once_renamed(
    old_schema_database_url: str, tmp_path: Path
) -> None:
    url = old_schema_database_url
    conn = await asyncpg.connect(url)
    try:
        alice = await _insert_user_bypassing_checks(conn, "alice", key=False)
        alice_upper = await _insert_user_bypassing_checks(conn, "Alice", key=False)
        alice_wide = await _insert_user_bypassing_checks(
            conn, "\uff41\uff4c\uff49\uff43\uff45", key=False
        )
        # A deleted user's name is free: no collision with a live one.
        await _insert_user_bypassing_checks(conn, "BOB", key=False, deleted=True)
        bob = await _insert_user_bypassing_checks(conn, "bob", key=False)
    finally:
        await conn.close()

    for command in (["serve"], ["migrate"]):
        refused = _authsvc(url, tmp_path, *command)
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        assert "Traceback" not in refused.stderr
        message = refused.stderr.strip()
        assert message.startswith("authsvc: migration 0"), message
        assert "_username_keys.sql" in message and "one account" in message
        for user_id in (alice, alice_upper, alice_wide):
            assert str(user_id) in message
        assert str(bob) not in message
        assert "serving on" not in refused.stdout

    conn = await asyncpg.connect(url)
    try:
        # Nothing of the refused migration stayed.
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
        )
        assert "username_key" not in {c["column_name"] for c in columns}
        # The operator renames, as the message says; now it applies.
        await conn.execute("UPDATE users SET username = 'alice-2' WHERE id = $1", alice_upper)
        await conn.execute("UPDATE users SET username = 'alice-3' WHERE id = $1", alice_wide)
    finally:
        await conn.close()
    migrated = _authsvc(url, tmp_path, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "_username_keys.sql" in migrated.stdout
    conn = await asyncpg.connect(url)
    try:
        keys = {
            r["id"]: r["username_key"]
            for r in await conn.fetch("SELECT id, username_key FROM users")
        }
        assert keys[alice] == "alice" and keys[bob] == "bob"
        with pytest.raises(asyncpg.UniqueViolationError):
            await _insert_user_bypassing_checks(conn, "ALICE")
    finally:
        await conn.close()
