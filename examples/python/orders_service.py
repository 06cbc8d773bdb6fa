"""An example microservice whose gRPC methods are protected by authsvc access tokens.

    python examples/python/orders_service.py     # needs authsvc on AUTHSVC_TARGET

`example.Orders` has three methods, with google.protobuf.StringValue requests and responses
so that the example needs no proto of its own:

- Create (unary): needs a token with the scope "orders:write"; stores an order for the caller;
- List (server streaming): needs any valid token; streams the caller's orders;
- Ping (unary): not protected.

Environment: AUTHSVC_TARGET (default 127.0.0.1:50051), AUTHSVC_SERVICE_TOKEN (if authsvc
requires one for Validate), ORDERS_LISTEN (default 127.0.0.1:50061).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from authsvc_client.client import AuthClient
from authsvc_client.interceptor import RequireAccessToken, current_principal
from google.protobuf.wrappers_pb2 import StringValue

SERVICE = "example.Orders"
CREATE = f"/{SERVICE}/Create"
LIST = f"/{SERVICE}/List"
PING = f"/{SERVICE}/Ping"

# The whole access policy: method → scopes its caller's token must carry.
REQUIRED_SCOPES: dict[str, tuple[str, ...]] = {
    CREATE: ("orders:write",),
    LIST: (),
}

Context = grpc.aio.ServicerContext[Any, Any]


class Orders:
    """The service's own logic: it only asks `current_principal()` who is calling."""

    def __init__(self) -> None:
        self._orders: dict[str, list[str]] = {}

    async def create_order(self, request: StringValue, context: Context) -> StringValue:
        caller = current_principal()
        self._orders.setdefault(caller.subject, []).append(request.value)
        return StringValue(value=f"{caller.subject}:{request.value}")

    async def list_orders(
        self, request: StringValue, context: Context
    ) -> AsyncIterator[StringValue]:
        for order in self._orders.get(current_principal().subject, []):
            yield StringValue(value=order)

    async def ping(self, request: StringValue, context: Context) -> StringValue:
        return StringValue(value="pong")


def orders_handler(orders: Orders) -> grpc.GenericRpcHandler:
    """`example.Orders` registered by hand (what generated code would do)."""
    message: dict[str, Any] = {
        "request_deserializer": StringValue.FromString,
        "response_serializer": StringValue.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Create": grpc.unary_unary_rpc_method_handler(orders.create_order, **message),
            "List": grpc.unary_stream_rpc_method_handler(orders.list_orders, **message),
            "Ping": grpc.unary_unary_rpc_method_handler(orders.ping, **message),
        },
    )


def build_server(
    auth: AuthClient,
    *,
    listen: str = "127.0.0.1:0",
    audience: str = "",
    clock: Callable[[], float] = time.time,
    **guard_options: Any,
) -> tuple[grpc.aio.Server, int, RequireAccessToken]:
    """The Orders server, protected by authsvc, its bound port (not started yet) and its
    guard (close it after the server: it follows authsvc's revocations)."""
    guard = RequireAccessToken(
        auth, REQUIRED_SCOPES, audience=audience, clock=clock, **guard_options
    )
    server = grpc.aio.server(interceptors=[guard])
    server.add_generic_rpc_handlers((orders_handler(Orders()),))
    port = server.add_insecure_port(listen)
    return server, port, guard


async def main() -> None:
    target = os.environ.get("AUTHSVC_TARGET", "127.0.0.1:50051")
    listen = os.environ.get("ORDERS_LISTEN", "127.0.0.1:50061")
    token = os.environ.get("AUTHSVC_SERVICE_TOKEN") or None
    async with AuthClient(target=target, service_token=token) as auth:
        server, port, guard = build_server(auth, listen=listen)
        await server.start()
        print(f"example.Orders on port {port}, tokens checked by authsvc at {target}", flush=True)
        try:
            await server.wait_for_termination()
        finally:
            await guard.close()


if __name__ == "__main__":
    asyncio.run(main())
