"""authsvc_client.interceptor.RequireAccessToken, through the worked example in examples/python.

The example is loaded in-process from its file with importlib (examples/ is not a package),
so that its server runs on port 0 in the test's event loop, its token checks read the test's
ManualClock and the test can count the Validate calls it makes to the real authsvc. This
branch's authsvc answers WatchRevocations UNIMPLEMENTED, so the interceptor's LocalValidator
asks Validate on every call (its behaviour against an older server); the local path is
tested against a fake authsvc in clients/python/tests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from authsvc_client.client import AuthClient, RetryPolicy
from authsvc_client.interceptor import RequireAccessToken, current_principal
from google.protobuf.wrappers_pb2 import StringValue

from tests.helpers import CountingAuthClient
from tests.live_server import LiveServer, ServerFactory

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python" / "orders_service.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("orders_service_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class OrdersApp:
    """The example service running, and a channel to call it."""

    auth: CountingAuthClient
    channel: grpc.aio.Channel
    guard: RequireAccessToken | None = None

    async def create(self, value: str, metadata: Sequence[tuple[str, str]] = ()) -> str:
        call = self.channel.unary_unary(
            example.CREATE,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        response: StringValue = await call(StringValue(value=value), metadata=tuple(metadata))
        return response.value

    async def list(self, metadata: Sequence[tuple[str, str]] = ()) -> list[str]:
        call = self.channel.unary_stream(
            example.LIST,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        return [item.value async for item in call(StringValue(), metadata=tuple(metadata))]

    async def ping(self) -> str:
        call = self.channel.unary_unary(
            example.PING,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        response: StringValue = await call(StringValue())
        return response.value


AppFactory = Callable[..., Awaitable[OrdersApp]]


@pytest.fixture
async def server(server_factory: ServerFactory) -> LiveServer:
    """The shared fixture's server, which may also issue tokens for the orders service."""
    return await server_factory(audiences=frozenset({"orders"}))


@pytest.fixture
async def orders_factory(server: LiveServer) -> AsyncIterator[AppFactory]:
    """Start the example on port 0 with `build_server(**options)`, its token checks on the
    server's ManualClock."""
    cleanup: list[tuple[grpc.aio.Server, grpc.aio.Channel, AuthClient, RequireAccessToken]] = []

    async def start(*, target: str | None = None, **options: Any) -> OrdersApp:
        auth = CountingAuthClient(target=target or server.address, retry=RetryPolicy(1))
        orders_server, port, guard = example.build_server(auth, clock=server.clock.now, **options)
        await orders_server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        cleanup.append((orders_server, channel, auth, guard))
        if target is None and guard.validator is not None:
            # Synced before the test's calls (until then the guard would ask Validate).
            await guard.validator.start()
        return OrdersApp(auth=auth, channel=channel, guard=guard)

    yield start
    for orders_server, channel, auth, guard in cleanup:
        await channel.close()
        await orders_server.stop(None)
        await guard.close()
        await auth.close()


@pytest.fixture
async def orders(orders_factory: AppFactory) -> OrdersApp:
    return await orders_factory()


async def rpc_code(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_good_token_reaches_the_handler_with_its_subject(
    server: LiveServer, orders: OrdersApp
) -> None:
    user = await server.create_user("alice", scopes=("orders:write",))
    pair = await server.login("alice")
    assert await orders.create("book", bearer(pair.access_token)) == f"{user.id}:book"
    assert await orders.create("pen", bearer(pair.access_token)) == f"{user.id}:pen"
    assert await orders.list(bearer(pair.access_token)) == ["book", "pen"]
    # another user's List sees only their own orders
    await server.create_user("bob")
    other = await server.login("bob")
    assert await orders.list(bearer(other.access_token)) == []


async def test_no_token_is_unauthenticated_and_asks_nobody(orders: OrdersApp) -> None:
    assert (await rpc_code(orders.create("x")))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await rpc_code(orders.list()))[0] == grpc.StatusCode.UNAUTHENTICATED
    for header in ("Bearer", "Bearer   ", "Basic dXNlcjpwdw==", "token-without-scheme"):
        code, _ = await rpc_code(orders.create("x", [("authorization", header)]))
        assert code == grpc.StatusCode.UNAUTHENTICATED, header
    assert orders.auth.validations == 0


async def test_bad_tokens_are_unauthenticated_without_echoing_them(
    server: LiveServer, orders: OrdersApp
) -> None:
    await server.create_user("carol", scopes=("orders:write",))
    pair = await server.login("carol")
    forged = pair.access_token[:-4] + ("AAAA" if not pair.access_token.endswith("AAAA") else "BBBB")
    for token in ("not-a-jwt", forged, pair.refresh_token):
        code, details = await rpc_code(orders.create("x", bearer(token)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert token not in details
    assert orders.auth.validations == 0  # refused in this process


async def test_missing_scope_is_permission_denied(server: LiveServer, orders: OrdersApp) -> None:
    await server.create_user("dave", scopes=("orders:read",))
    pair = await server.login("dave")
    code, _ = await rpc_code(orders.create("x", bearer(pair.access_token)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert await orders.list(bearer(pair.access_token)) == []  # List needs no scope


async def test_unprotected_method_passes_untouched(orders: OrdersApp) -> None:
    assert await orders.ping() == "pong"
    assert orders.auth.validations == 0


async def test_calls_are_checked_locally_and_a_revocation_arrives_without_a_call(
    server: LiveServer, orders: OrdersApp
) -> None:
    """The guard's LocalValidator follows WatchRevocations: no protected call asks Validate,
    and a revoked session is refused as soon as its update arrives (no answer cache)."""
    await server.create_user("erin", scopes=("orders:write",))
    pair = await server.login("erin")
    await orders.create("a", bearer(pair.access_token))
    await orders.list(bearer(pair.access_token))
    assert orders.guard is not None and orders.guard.validator is not None
    assert orders.guard.validator.fresh
    assert await orders.auth.revoke(access_token=pair.access_token) == 1
    deadline = asyncio.get_running_loop().time() + 2.0
    while orders.guard.validator.validate(pair.access_token).valid:
        assert asyncio.get_running_loop().time() < deadline, "the revocation did not arrive"
        await asyncio.sleep(0.005)
    code, _ = await rpc_code(orders.create("c", bearer(pair.access_token)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert orders.auth.validations == 0


async def test_expiry_is_checked_on_the_callers_clock(
    server: LiveServer, orders: OrdersApp
) -> None:
    await server.create_user("fay", scopes=("orders:write",))
    pair = await server.login("fay")
    server.clock.advance(899)
    await orders.create("a", bearer(pair.access_token))
    server.clock.advance(2)  # past the token's exp (AUTH_ACCESS_TTL 900)
    code, _ = await rpc_code(orders.create("b", bearer(pair.access_token)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_remote_validate_asks_authsvc_on_every_call(
    server: LiveServer, orders_factory: AppFactory
) -> None:
    orders = await orders_factory(remote_validate=True)
    assert orders.guard is not None
    assert orders.guard.validator is None
    await server.create_user("gus", scopes=("orders:write",))
    pair = await server.login("gus")
    await orders.create("a", bearer(pair.access_token))
    await orders.create("b", bearer(pair.access_token))
    assert orders.auth.validations == 2


async def test_audience_is_required_when_configured(
    server: LiveServer, orders_factory: AppFactory
) -> None:
    # The server fixture of this module lets Issue grant "orders" (AUTH_AUDIENCES).
    orders = await orders_factory(audience="orders")
    await server.create_user("hal", scopes=("orders:write",))
    for_orders = await server.login("hal", audience="orders")
    for_default = await server.login("hal")
    assert (await orders.create("a", bearer(for_orders.access_token))).endswith(":a")
    code, _ = await rpc_code(orders.create("b", bearer(for_default.access_token)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_authsvc_unreachable_is_unavailable(
    orders_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    orders = await orders_factory(target=f"127.0.0.1:{free_port()}")
    code, _ = await rpc_code(orders.create("a", bearer("some.jwt.token")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert orders.auth.validations == 1
    # Any caller can make us ask: a flood of them is not a flood of log lines.
    for n in range(10):
        code, _ = await rpc_code(orders.create("a", bearer(f"some.jwt.token{n}")))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert len([r for r in caplog.records if "Validate failed" in r.getMessage()]) == 1


def test_current_principal_outside_a_protected_call_raises() -> None:
    with pytest.raises(LookupError, match="not protected"):
        current_principal()


# --- other handler shapes, and fail-closed sync handlers -----------------


@pytest.fixture
async def shapes(server: LiveServer) -> AsyncIterator[tuple[CountingAuthClient, grpc.aio.Channel]]:
    """A service with one handler of each shape, all protected."""
    seen: list[str] = []

    async def written(request: StringValue, context: Any) -> None:
        # a coroutine streaming handler that writes through the context
        await context.write(StringValue(value=current_principal().subject))

    async def upload(requests: AsyncIterator[StringValue], context: Any) -> StringValue:
        values = [r.value async for r in requests]
        return StringValue(value=f"{current_principal().subject}:{','.join(values)}")

    async def chat(
        requests: AsyncIterator[StringValue], context: Any
    ) -> AsyncIterator[StringValue]:
        async for request in requests:
            yield StringValue(value=f"{current_principal().subject}:{request.value}")

    def sync_handler(request: StringValue, context: Any) -> StringValue:
        seen.append("sync handler ran")
        return StringValue(value="unprotected!")

    codec: dict[str, Any] = {
        "request_deserializer": StringValue.FromString,
        "response_serializer": StringValue.SerializeToString,
    }
    handlers = {
        "Written": grpc.unary_stream_rpc_method_handler(written, **codec),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, **codec),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, **codec),
        "Sync": grpc.unary_unary_rpc_method_handler(sync_handler, **codec),
    }
    auth = CountingAuthClient(target=server.address)
    guard = RequireAccessToken(
        auth,
        {f"/example.Shapes/{name}": () for name in handlers},
        clock=server.clock.now,
    )
    assert guard.validator is not None
    await guard.validator.start()
    shapes_server = grpc.aio.server(interceptors=[guard])
    shapes_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("example.Shapes", handlers),)
    )
    port = shapes_server.add_insecure_port("127.0.0.1:0")
    await shapes_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield auth, channel
    assert seen == []
    await channel.close()
    await shapes_server.stop(None)
    await guard.close()
    await auth.close()


def requests(*values: str) -> Iterator[StringValue]:
    return (StringValue(value=v) for v in values)


async def test_every_handler_shape_is_protected(
    server: LiveServer, shapes: tuple[CountingAuthClient, grpc.aio.Channel]
) -> None:
    auth, channel = shapes
    user = await server.create_user("ivy")
    token = (await server.login("ivy")).access_token
    ser, de = StringValue.SerializeToString, StringValue.FromString
    written = channel.unary_stream("/example.Shapes/Written", ser, de)
    upload = channel.stream_unary("/example.Shapes/Upload", ser, de)
    chat = channel.stream_stream("/example.Shapes/Chat", ser, de)
    sync = channel.unary_unary("/example.Shapes/Sync", ser, de)

    assert [r.value async for r in written(StringValue(), metadata=bearer(token))] == [str(user.id)]
    uploaded = await upload(requests("a", "b"), metadata=bearer(token))
    assert uploaded.value == f"{user.id}:a,b"
    chatted = [r.value async for r in chat(requests("x", "y"), metadata=bearer(token))]
    assert chatted == [f"{user.id}:x", f"{user.id}:y"]

    for call in (
        written(StringValue()).read(),
        upload(requests("a")),
        chat(requests("x")).read(),
    ):
        assert (await rpc_code(call))[0] == grpc.StatusCode.UNAUTHENTICATED
    # a synchronous handler is refused, not run unchecked (the fixture asserts it never ran)
    assert (await rpc_code(sync(StringValue(), metadata=bearer(token))))[0] == (
        grpc.StatusCode.INTERNAL
    )
    assert auth.validations == 0  # every token checked in this process


@pytest.mark.system
async def test_the_example_runs_as_a_script(server: LiveServer) -> None:
    """`python examples/python/orders_service.py`, as its README says, against authsvc."""
    await server.create_user("kim", scopes=("orders:write",))
    pair = await server.login("kim")
    env = {
        **os.environ,
        "AUTHSVC_TARGET": server.address,
        "ORDERS_LISTEN": "127.0.0.1:0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
        found = re.search(r"on port (\d+)", banner)
        assert found is not None, banner
        port = int(found.group(1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            app = OrdersApp(auth=CountingAuthClient(target=server.address), channel=channel)
            assert await app.ping() == "pong"
            assert (await rpc_code(app.create("x")))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await app.create("x", bearer(pair.access_token))).endswith(":x")
    finally:
        process.terminate()
        await process.wait()


async def test_authsvc_refusing_this_service_is_not_the_callers_fault(
    server_factory: ServerFactory,
    orders_factory: AppFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """authsvc requires a service token for Validate and this service has none: the caller's
    token is fine, so the caller must not be told UNAUTHENTICATED."""
    tokens_file = tmp_path / "service-tokens"
    tokens_file.write_text("orders validate token:orders-service-token-0123456789abcdef\n")
    # A replica of the fixture's server: the same shared settings (its audiences).
    guarded = await server_factory(
        caller_auth=frozenset({"validate"}),
        service_tokens_file=tokens_file,
        audiences=frozenset({"orders"}),
    )
    await guarded.create_user("lee", scopes=("orders:write",))
    pair = await guarded.login("lee")
    orders = await orders_factory(target=guarded.address)
    for _ in range(10):
        code, details = await rpc_code(orders.create("x", bearer(pair.access_token)))
        assert code == grpc.StatusCode.INTERNAL
        assert pair.access_token not in details
    # Logged once a minute on our side, once per source and window on authsvc's.
    assert len([r for r in caplog.records if "authsvc Validate refused" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "Validate refused (" in r.getMessage()]) == 1
