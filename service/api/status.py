"""The one place where domain errors become gRPC statuses with rich details, and the one
wrapper every servicer method runs in (`maps_errors`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.api.wire import UndecodableRequest
from service.errors import (
    ERROR_DOMAIN,
    AuthError,
    FieldViolation,
    InvalidArgument,
    LoginThrottled,
)

log = logging.getLogger(__name__)

Servicer = TypeVar("Servicer")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Servicer, Req, Context], Awaitable[Resp]]


def _packed(
    message: error_details_pb2.ErrorInfo
    | error_details_pb2.BadRequest
    | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_status(error: AuthError) -> grpc.Status:
    """A google.rpc.Status with an ErrorInfo (plus BadRequest for field errors, RetryInfo
    for throttling)."""
    code = grpc.StatusCode[error.code]
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))]
    if isinstance(error, InvalidArgument):
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, LoginThrottled):
        retry_info = error_details_pb2.RetryInfo()
        retry_info.retry_delay.FromMilliseconds(max(1, round(error.retry_after * 1000)))
        details.append(_packed(retry_info))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


RefusalRecorder = Callable[[Servicer, str, AuthError, Context], Awaitable[None]]
"""Told of every AuthError a method answers with (method name, error, call context)."""


def maps_errors(
    handler: Handler[Servicer, Req, Resp],
    *,
    on_refused: RefusalRecorder[Servicer] | None = None,
) -> Handler[Servicer, Req, Resp]:
    """Wrap a servicer method: a request that did not parse → INVALID_ARGUMENT (before the
    method runs); AuthError → its status (told to `on_refused` first, unless it is our own
    UNAVAILABLE); anything else → a bare INTERNAL.

    The unexpected case logs the exception type and traceback but never the
    request, which may hold passwords and tokens.
    """

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Req, context: Context) -> Resp:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgument(
                    [FieldViolation("request", "is not a valid protobuf message")]
                )
            return await handler(self, request, context)
        except AuthError as error:
            # UNAVAILABLE is our failure, not a refusal; and recording it would only delay it.
            if on_refused is not None and error.code != "UNAVAILABLE":
                await on_refused(self, handler.__name__, error, context)
            await context.abort_with_status(to_status(error))
            raise  # abort_with_status raises; this line only satisfies the type checker
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise

    return wrapper
