"""The handlers an interceptor wrapped, one per method, and the registration that wraps
each method's handler in the interceptors once (`LayeredRegistration`).

grpc.aio asks every interceptor on every call; wrapping the method's handler anew each
time would cost more than most calls. So each handler is wrapped once, and its wrapper
(or None: the interceptor refuses to serve the method) reused for as long as the server
hands out the same handler object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import grpc

# A string: grpc.RpcMethodHandler is generic only to the type checker.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappedHandlers:
    """An interceptor's wrapper of each method's handler."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler | None]] = {}

    def get(self, method: str, handler: Handler, wrap: Callable[[], Handler | None]) -> Any:
        """The wrapper of `handler` for `method`, made by `wrap` the first time."""
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap()
        self._by_method[method] = (handler, wrapped)
        return wrapped


Layer: TypeAlias = Callable[[str, Handler], "Handler | None"]
"""What one interceptor does to a method's handler (its `wrap`): the handler to serve the
method with, the same one if it has nothing to do for the method, or None (not served)."""


def in_layers(method: str, handler: Handler, layers: Sequence[Layer]) -> Handler | None:
    """`handler` inside every layer, the first outermost (as in grpc.aio's list of
    interceptors); None if a layer refuses to serve the method."""
    wrapped: Handler | None = handler
    for layer in reversed(layers):
        assert wrapped is not None
        wrapped = layer(method, wrapped)
        if wrapped is None:
            return None
    return wrapped


class _LayeredGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose handlers are served inside the layers (wrapped once each)."""

    def __init__(self, inner: grpc.GenericRpcHandler, layers: Sequence[Layer]) -> None:
        self._inner = inner
        self._layers = layers
        self._wrapped = WrappedHandlers()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        wrapped: Handler | None = self._wrapped.get(
            method, handler, lambda: in_layers(method, handler, self._layers)
        )
        return wrapped


class HandlerRegistry(Protocol):
    """Where services register their handlers: a grpc.aio server, or a
    `LayeredRegistration` in front of one."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler], /) -> None: ...

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, Handler], /
    ) -> None: ...


class LayeredRegistration:
    """Stands in for a grpc.aio server while services register with it (the generated
    `add_*_to_server` functions call these two methods): each method's handler is wrapped in
    the layers once, there, instead of asking every interceptor on every call. A layer with
    nothing to do for a method leaves its handler as it is, so such a method pays nothing
    for it."""

    def __init__(self, server: grpc.aio.Server, layers: Sequence[Layer]) -> None:
        self._server = server
        self._layers = tuple(layers)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_LayeredGenericHandler(h, self._layers) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, Handler]
    ) -> None:
        layered = {}
        for name, handler in handlers.items():
            wrapped = in_layers(f"/{service_name}/{name}", handler, self._layers)
            if wrapped is not None:  # refused: not registered (UNIMPLEMENTED)
                layered[name] = wrapped
        self._server.add_registered_method_handlers(service_name, layered)
