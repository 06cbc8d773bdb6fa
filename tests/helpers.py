"""Small helpers for tests: reading rich error details off a failed call."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (fails the test if there is none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the call carried no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("the status carried no ErrorInfo")


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    raise AssertionError("the status carried no BadRequest")


def assert_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info.domain == "authsvc"
    assert info.reason == reason
