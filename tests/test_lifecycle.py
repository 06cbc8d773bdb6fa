"""The whole lifecycle over gRPC: login, validate, refresh, reuse, revoke."""

from __future__ import annotations

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from tests.helpers import assert_error
from tests.live_server import LiveServer


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


async def test_health_and_reflection_are_served(server: LiveServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "auth.v1.AuthService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflection.ServerReflectionInfo(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
        assert "auth.v1.AuthService" in names
        break
    else:
        raise AssertionError("no reflection reply")
