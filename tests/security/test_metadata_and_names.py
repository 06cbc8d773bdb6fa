"""Client-chosen text that ends up stored or shown: metadata (user agent, authorization)
sent raw over HTTP/2 with bytes no gRPC client sends, NUL in every string field of every
request, and usernames (one account per canonical name, no control characters)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from service.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2
from tests.conftest import PASSWORD, LiveServer, ServerFactory
from tests.helpers import status_detail
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
