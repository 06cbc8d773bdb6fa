"""`MetricsInterceptor`: counts each unary gRPC call by method and final status code, and
times it, into a `PrometheusTelemetry`."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.api.wrapped_handlers import WrappedHandlers
from service.metrics.telemetry import PrometheusTelemetry

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts unary-unary calls by method and final status code, and times them.

    Streaming handlers (health Watch, reflection) pass through untouched, and so do
    unknown methods (no handler), which would otherwise let any caller add label values.
    """

    def __init__(self, telemetry: PrometheusTelemetry) -> None:
        self._telemetry = telemetry
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails],
            Awaitable[grpc.RpcMethodHandler[_TRequest, _TResponse] | None],
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        wrapped: grpc.RpcMethodHandler[_TRequest, _TResponse] = self._wrapped.get(
            method, handler, lambda: self.wrap(method, handler)
        )
        return wrapped

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[_TRequest, _TResponse]
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse]:
        """`handler` counted and timed as `method` (a streaming one as it is): the layer
        `service.server` applies once, when the method is registered."""
        if handler.request_streaming or handler.response_streaming:
            return handler
        if handler.unary_unary is None:
            return handler
        # Typed by the stubs for the sync server; grpc.aio passes its own context.
        inner: Callable[..., Any] = handler.unary_unary
        clock = time.perf_counter
        # Looked up when a call ends (one dict lookup): a method's series appear once it
        # is called, not when it is registered.
        rpc = self._telemetry.rpc

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = clock()
            try:
                response = await inner(request, context)
            except asyncio.CancelledError:
                rpc(method).finished(_code_when_cancelled(context), clock() - started)
                raise
            except Exception:
                rpc(method).finished(_code_when_raised(context), clock() - started)
                raise
            rpc(method).finished(_code_when_returned(context), clock() - started)
            return response

        def sync_behavior(request: Any, context: Any) -> Any:
            started = clock()
            # The context grpc.aio gives a plain function has no code(): watch the calls.
            watched = _CodeWatchingContext(context)
            try:
                response = inner(request, watched)
            except Exception:
                rpc(method).finished(_code_when_raised(watched), clock() - started)
                raise
            rpc(method).finished(_code_when_returned(watched), clock() - started)
            return response

        # grpc.aio runs a plain function differently (in its thread pool if it has one):
        # keep the wrapper the same kind as the handler so that does not change.
        wrapper = behavior if inspect.iscoroutinefunction(inner) else sync_behavior
        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _CodeWatchingContext:
    """A plain-function handler's context that remembers the code set on it."""

    __slots__ = ("_code", "_context")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Any:
        self._code = code
        return self._context.abort(code, details, trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


_Context = grpc.aio.ServicerContext[Any, Any] | _CodeWatchingContext


def _code_when_returned(context: _Context) -> grpc.StatusCode:
    code: grpc.StatusCode | None = context.code()  # None unless set_code() was called
    return grpc.StatusCode.OK if code is None else code


def _code_when_raised(context: _Context) -> grpc.StatusCode:
    # abort() sets the code before raising AbortError, and a code set with set_code()
    # before any other exception is also what the client receives; else UNKNOWN.
    code: grpc.StatusCode | None = context.code()
    return grpc.StatusCode.UNKNOWN if code is None or code is grpc.StatusCode.OK else code


def _code_when_cancelled(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    # grpc.aio cancels the handler when the client cancels or the deadline passes, and
    # sets no code in either case: tell them apart by the time left.
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
