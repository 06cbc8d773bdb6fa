"""Calls whose request never arrives: a client sends the headers of a unary call (Issue,
Refresh, Validate, ...) and then nothing, or half a message. The servicer only sees a unary
call once its request is whole, so its budget (AUTH_MAX_CONCURRENT_RPCS) never counts
these, and each holds server memory (~15 KB) for as long as its connection lives. They are
bounded twice: gRPC's own limit counts every call from its headers (AUTH_MAX_CONCURRENT_RPCS
+ AUTH_MAX_STREAMS: beyond it, RESOURCE_EXHAUSTED at once), and a connection is told to go
after AUTH_STREAM_MAX_AGE and closed, with whatever it still holds, twice that later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from tests.live_server import LiveServer, ServerFactory


def _raw(data: bytes) -> bytes:
    return data


def _stalled_calls(
    channel: grpc.aio.Channel, method: str, count: int, stop: asyncio.Event
) -> list[grpc.aio.StreamUnaryCall[bytes, bytes]]:
    """`count` calls of the unary `method` that send their headers and no request message
    (until `stop`): on the wire, a unary call whose request never comes."""

    async def no_request() -> AsyncIterator[bytes]:
        await stop.wait()
        return
        yield b""  # an async generator that yields nothing

    stalled = channel.stream_unary(method, request_serializer=_raw, response_deserializer=_raw)
    return [stalled(no_request()) for _ in range(count)]


async def _answered(call: Awaitable[bytes]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_calls_whose_request_never_arrives_are_counted_and_refused_beyond_the_limit(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(max_concurrent_rpcs=3, max_streams=2)
    stop = asyncio.Event()
    calls = _stalled_calls(server.channel, "/auth.v1.AuthService/Issue", 8, stop)
    answers = [asyncio.create_task(_answered(call)) for call in calls]
    done, pending = await asyncio.wait(answers, timeout=10)
    # 3 + 2 held (the server cannot tell them from slow clients); the rest refused at once.
    assert [task.result() for task in done] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert len(pending) == 5
    # A whole call is refused too while they are held: the limit is the server's, not a
    # connection's.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    jwks = server.channel.unary_unary(
        "/auth.v1.AuthService/GetJwks", request_serializer=_raw, response_deserializer=_raw
    )
    for call in calls:
        call.cancel()
    await asyncio.wait(answers, timeout=10)
    deadline = time.monotonic() + 10
    while (code := await _answered(jwks(b"", timeout=10))) != grpc.StatusCode.OK:
        # The server learns of the cancellations in its own time.
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() < deadline, "the stalled calls were never let go"
        await asyncio.sleep(0.05)


async def test_a_connection_holding_a_stalled_call_is_closed_after_three_times_the_stream_max_age(
    server_factory: ServerFactory,
) -> None:
    server: LiveServer = await server_factory(stream_max_age=1.0)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(server.address) as channel:
        started = time.monotonic()
        (call,) = _stalled_calls(channel, "/auth.v1.AuthService/Refresh", 1, stop)
        code = await asyncio.wait_for(_answered(call), timeout=15)
        took = time.monotonic() - started
    assert code == grpc.StatusCode.UNAVAILABLE
    # Told to go after ~1 s (gRPC moves it by up to 10 % either way), closed 2 s after that.
    assert 1.5 < took < 6
    # Whole calls on a new connection are served as before.
    assert (await server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)).jwks_json
