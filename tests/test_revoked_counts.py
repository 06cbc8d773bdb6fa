"""The count of revoked sessions a user-wide revocation answers (DisableUser, SetPassword,
DeleteUser, Revoke by subject) stops at REVOKED_COUNT_LIMIT, so that the call reads a
bounded range of the index: past it, the answer says the count is a lower bound instead of
passing 10000 off as exact."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2

from service.cli import revoked_sessions_text
from service.domain.revocation import REVOKED_COUNT_LIMIT, revoked_count_is_lower_bound
from service.store import revocations
from tests.live_server import LiveServer
from tests.test_many_sessions import seed_sessions

Call = Callable[[LiveServer, uuid.UUID, auth_pb2.TokenPair], Awaitable[Any]]


async def _disable(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> Any:
    return await admin_pb2_grpc.AdminServiceStub(server.channel).DisableUser(
        admin_pb2.DisableUserRequest(user=admin_pb2.UserSelector(user_id=str(user_id)))
    )


async def _set_password(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> Any:
    return await admin_pb2_grpc.AdminServiceStub(server.channel).SetPassword(
        admin_pb2.SetPasswordRequest(
            user=admin_pb2.UserSelector(user_id=str(user_id)), password="another passphrase 42"
        )
    )


async def _delete(server: LiveServer, user_id: uuid.UUID, _: auth_pb2.TokenPair) -> Any:
    return await admin_pb2_grpc.AdminServiceStub(server.channel).DeleteUser(
        admin_pb2.DeleteUserRequest(user=admin_pb2.UserSelector(user_id=str(user_id)))
    )


async def _logout_everywhere(
    server: LiveServer, user_id: uuid.UUID, pair: auth_pb2.TokenPair
) -> Any:
    return await server.stub.Revoke(
        auth_pb2.RevokeRequest(subject=str(user_id)),
        metadata=(("authorization", f"Bearer {pair.access_token}"),),
    )


CALLS: dict[str, Call] = {
    "DisableUser": _disable,
    "SetPassword": _set_password,
    "DeleteUser": _delete,
    "Revoke(subject)": _logout_everywhere,
}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_count_past_the_limit_is_answered_as_a_lower_bound(
    server: LiveServer, call: str
) -> None:
    many = await server.create_user()
    pair = await server.login(many.username)
    await seed_sessions(server, many.id, REVOKED_COUNT_LIMIT + 5)
    answer = await CALLS[call](server, many.id, pair)
    assert answer.revoked_sessions == REVOKED_COUNT_LIMIT
    assert answer.revoked_sessions_is_lower_bound, "10000 was passed off as the exact count"

    few = await server.create_user()
    pair = await server.login(few.username)
    await seed_sessions(server, few.id, 2)
    answer = await CALLS[call](server, few.id, pair)
    assert answer.revoked_sessions == 3
    assert not answer.revoked_sessions_is_lower_bound


def test_the_limit_is_the_one_the_store_counts_to() -> None:
    assert REVOKED_COUNT_LIMIT == revocations.REVOKED_COUNT_LIMIT
    assert revoked_count_is_lower_bound(REVOKED_COUNT_LIMIT)
    assert not revoked_count_is_lower_bound(REVOKED_COUNT_LIMIT - 1)


def test_the_cli_says_at_least() -> None:
    """`authsvc users disable|delete` print the count."""
    assert revoked_sessions_text(3) == "3"
    assert revoked_sessions_text(REVOKED_COUNT_LIMIT) == f"at least {REVOKED_COUNT_LIMIT}"
