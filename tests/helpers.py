"""Small helpers for tests: reading rich error details off a failed call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import grpc
import pytest
from authsvc_client.client import AuthClient, Validation
from authsvc_client.gen.auth.v1 import auth_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.live_server import LiveServer

Detail = TypeVar("Detail", bound=Message)


def status_detail(error: grpc.aio.AioRpcError, kind: type[Detail]) -> Detail:
    """The detail of type `kind` in a failed call's google.rpc.Status (fails the test if
    there is none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the call carried no google.rpc.Status"
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    raise AssertionError(f"the status carried no {kind.DESCRIPTOR.name}")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    return status_detail(error, error_details_pb2.ErrorInfo)


async def login_reason(server: LiveServer, username: str, password: str) -> str:
    """How a login ends: "OK", or the ErrorInfo reason of its refusal."""
    try:
        await server.login(username, password=password)
    except grpc.aio.AioRpcError as error:
        return error_info(error).reason
    return "OK"


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail of a failed call."""
    return [v.field for v in status_detail(error, error_details_pb2.BadRequest).field_violations]


def assert_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info.domain == "authsvc"
    assert info.reason == reason


async def refresh(server: LiveServer, token: str) -> auth_pb2.TokenPair:
    """Refresh over gRPC; the new token pair."""
    response = await server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=token))
    return response.tokens


async def refresh_fails(server: LiveServer, token: str, reason: str) -> None:
    """Refresh(token) must fail UNAUTHENTICATED with `reason`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refresh(server, token)
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, reason)


async def validate(
    server: LiveServer,
    token: str,
    *,
    required_scopes: tuple[str, ...] = (),
    audience: str = "",
) -> auth_pb2.ValidateResponse:
    """Validate over gRPC."""
    return await server.stub.Validate(
        auth_pb2.ValidateRequest(
            access_token=token, required_scopes=list(required_scopes), audience=audience
        )
    )


class CountingAuthClient(AuthClient):
    """An AuthClient that counts its Validate calls."""

    validations = 0

    async def validate(
        self,
        access_token: str,
        *,
        required_scopes: Sequence[str] = (),
        audience: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 (the signature of AuthClient.validate)
    ) -> Validation:
        self.validations += 1
        return await super().validate(
            access_token, required_scopes=required_scopes, audience=audience, timeout=timeout
        )


# Characters that look like a comma but are not one, which an audience or a list setting
# must refuse (written out here, not taken from the service, so that dropping one fails).
COMMA_LOOK_ALIKES = (
    "\uff0c",
    "\u3001",
    "\ufe50",
    "\ufe51",
    "\uff64",
    # The outside-in review's second round: commas of other scripts and a quotation mark.
    "\u201a",  # SINGLE LOW-9 QUOTATION MARK
    "\u060c",  # ARABIC COMMA
    "\u2e34",  # RAISED COMMA
    "\ua4fe",  # LISU PUNCTUATION COMMA
    "\u1363",  # ETHIOPIC COMMA
    "\u07f8",  # NKO COMMA
    "\u2e41",  # REVERSED COMMA
    "\u2e4c",  # MEDIEVAL COMMA
)
