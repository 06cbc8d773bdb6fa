"""The handlers an interceptor wrapped, one per method.

grpc.aio asks every interceptor on every call; wrapping the method's handler anew each
time would cost more than most calls. So each handler is wrapped once, and its wrapper
(or None: the interceptor refuses to serve the method) reused for as long as the server
hands out the same handler object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

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
