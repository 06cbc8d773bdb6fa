"""The whole lifecycle over gRPC: login, validate, refresh, reuse, revoke."""

from __future__ import annotations

import grpc
import pytest

from service.gen.auth.v1 import auth_pb2
from tests.conftest import LiveServer
from tests.helpers import assert_error


async def test_login_validate_refresh_and_reuse_kills_the_family(server: LiveServer) -> None:
    user = await server.create_user("alice", scopes=("read", "write"))
    pair = await server.login("alice")
    assert pair.token_type == "Bearer"
    assert set(pair.scopes) == {"read", "write"}

    verdict = await server.stub.Validate(auth_pb2.ValidateRequest(access_token=pair.access_token))
    assert verdict.valid
    assert verdict.subject == str(user.id)
    assert verdict.session_id == pair.session_id

    rotated = (
        await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
    ).tokens
    assert rotated.refresh_token != pair.refresh_token
    assert rotated.session_id == pair.session_id

    # The child is used, so presenting the parent again is theft.
    await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=rotated.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")

    verdict = await server.stub.Validate(
        auth_pb2.ValidateRequest(access_token=rotated.access_token)
    )
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
