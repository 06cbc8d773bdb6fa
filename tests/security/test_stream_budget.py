"""Long-lived streams (health Watch, reflection, and any streaming RPC added later) have
their own budget: in all, per peer address, per connection and in time, so that idle
streams cannot use up the calls that Issue, Validate and GetJwks need."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.callers import (
    CallerAuthInterceptor,
    KnownService,
    ServiceDirectory,
    calling_service,
)
from service.api.streams import (
    CallBudgetInterceptor,
    StreamBudget,
    UnaryBudget,
    transport_options,
)
from service.domain.events import peer_address
from service.errors import ShuttingDown, TooManyCalls, TooManyStreams, TooManyStreamsFromPeer
from service.settings import Settings, SettingsError
from tests.helpers import assert_error
from tests.live_server import LiveServer, ServerFactory

SERVING = health_pb2.HealthCheckResponse.SERVING
Stream = grpc.aio.Call
OpenedStream = TypeVar("OpenedStream", bound=grpc.aio.Call)

# Liveness bound: a call that should be served is answered well within this.
ANSWERED_WITHIN = 10.0


def own_connection(target: str) -> grpc.aio.Channel:
    """A channel with its own TCP connection (channels to one target otherwise share one)."""
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def open_watch(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]:
    """A health Watch that has answered its first status and now sits idle; raises the
    AioRpcError if the server refuses it."""
    call: grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    first = await call.read()
    assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == SERVING
    return call


async def open_reflection(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[Any, Any]:
    """A reflection stream that has answered one request and now sits idle."""
    call: grpc.aio.StreamStreamCall[Any, Any]
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
    assert reply.HasField("list_services_response")
    return call


async def refused(opening: Awaitable[Stream]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(opening, ANSWERED_WITHIN)
    return caught.value


async def eventually(open_stream: Callable[[], Awaitable[OpenedStream]]) -> OpenedStream:
    """The stream opens once the slot of a closed one is back (liveness, not speed)."""
    deadline = time.monotonic() + ANSWERED_WITHIN
    while True:
        try:
            return await open_stream()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def attempt(opening: Awaitable[Stream]) -> Stream | grpc.aio.AioRpcError:
    try:
        return await opening
    except grpc.aio.AioRpcError as error:
        return error


def close_all(calls: list[Any]) -> None:
    for call in calls:
        if isinstance(call, grpc.aio.Call):
            call.cancel()


async def unary_calls_are_served(
    server: LiveServer, stub: auth_pb2_grpc.AuthServiceAsyncStub
) -> None:
    """Issue, Validate and GetJwks answer (an Issue on `server`'s own client)."""
    pair = await asyncio.wait_for(server.login("bystander"), ANSWERED_WITHIN)
    answer = await stub.Validate(
        auth_pb2.ValidateRequest(access_token=pair.access_token), timeout=ANSWERED_WITHIN
    )
    assert answer.valid
    jwks = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=ANSWERED_WITHIN)
    assert '"keys"' in jwks.jwks_json


async def test_idle_health_watch_and_reflection_streams_do_not_starve_unary_calls(
    server_factory: ServerFactory,
) -> None:
    """One client opens 1,000 health Watch streams and 20 reflection streams on one
    connection and leaves them idle: Issue, Validate and GetJwks from another client are
    still served, and so are unary calls on the attacker's own busy connection."""
    server = await server_factory(max_concurrent_rpcs=20)
    await server.create_user("bystander")
    attacker = own_connection(server.address)
    streams: list[Stream | grpc.aio.AioRpcError] = []
    try:
        streams += await asyncio.gather(*(attempt(open_reflection(attacker)) for _ in range(20)))
        streams += await asyncio.gather(*(attempt(open_watch(attacker)) for _ in range(1000)))
        held = [s for s in streams if not isinstance(s, grpc.aio.AioRpcError)]
        assert held, "some streams are allowed"

        await unary_calls_are_served(server, server.stub)
        await unary_calls_are_served(server, auth_pb2_grpc.AuthServiceStub(attacker))

        # More streams are held than the unary budget has room for: they do not share it.
        per_peer = server.settings.max_streams_per_peer
        assert len(held) == per_peer > server.settings.max_concurrent_rpcs
        # The rest were refused by the peer's budget, or (those sent while the connection
        # was at its HTTP/2 stream cap) by the transport with REFUSED_STREAM.
        over_budget = 0
        for error in streams:
            if not isinstance(error, grpc.aio.AioRpcError):
                continue
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                assert "RST_STREAM" in (error.details() or ""), error.details()
                continue
            assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS_FROM_PEER")
            over_budget += 1
        assert over_budget > 0
        # The held streams still work: they hear a status change.
        await server.running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        watches: list[grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]] = [
            s for s in held if isinstance(s, grpc.aio.UnaryStreamCall)
        ]
        assert watches
        for watch in watches:
            update = await asyncio.wait_for(watch.read(), ANSWERED_WITHIN)
            assert isinstance(update, health_pb2.HealthCheckResponse)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        close_all(streams)
        await attacker.close()


async def test_one_peer_holds_at_most_its_share_of_streams_on_any_connection(
    server_factory: ServerFactory,
) -> None:
    """AUTH_MAX_STREAMS_PER_PEER counts the streams of one address over all its
    connections, Watch and reflection alike; a closed stream gives its slot back."""
    server = await server_factory(max_streams_per_peer=3, max_streams=100)
    first, second = own_connection(server.address), own_connection(server.address)
    held: list[Stream] = []
    try:
        held += [await open_watch(first), await open_watch(first), await open_reflection(second)]
        for opening in (
            open_watch(first),
            open_watch(second),
            open_reflection(first),
            open_watch(server.channel),
        ):
            error = await refused(opening)
            assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS_FROM_PEER")
            assert "streams" in (error.details() or "")
        # Unary calls from the same address are not streams: served.
        await unary_calls_are_served_from(server, first)

        held.pop(0).cancel()
        held.append(await eventually(lambda: open_watch(second)))
        assert_error(
            await refused(open_watch(first)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS_FROM_PEER",
        )
    finally:
        close_all(held)
        await first.close()
        await second.close()


async def unary_calls_are_served_from(server: LiveServer, channel: grpc.aio.Channel) -> None:
    jwks = await auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
        auth_pb2.GetJwksRequest(), timeout=ANSWERED_WITHIN
    )
    assert jwks.jwks_json


async def test_streams_in_all_are_capped_and_one_peer_cannot_take_them_all(
    server_factory: ServerFactory,
) -> None:
    """Two addresses (IPv4 and IPv6 loopback): each is capped at its per-peer share, so
    the other still gets streams; beyond AUTH_MAX_STREAMS in all, every peer is refused."""
    server = await server_factory(listen="localhost:0", max_streams_per_peer=2, max_streams=3)
    ipv4 = own_connection(f"127.0.0.1:{server.running.port}")
    ipv6 = own_connection(f"ipv6:[::1]:{server.running.port}")
    held: list[Stream] = []
    try:
        held += [await open_watch(ipv4), await open_reflection(ipv4)]
        assert_error(
            await refused(open_watch(ipv4)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS_FROM_PEER",
        )
        held.append(await open_watch(ipv6))  # the other peer's share is untouched
        for opening in (open_watch(ipv6), open_reflection(ipv6), open_watch(ipv4)):
            error = await refused(opening)
            # The budget in all is checked first: the whole server is at its limit.
            assert_error(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        await unary_calls_are_served_from(server, ipv6)

        held.pop(0).cancel()  # one of the IPv4 peer's
        held.append(await eventually(lambda: open_watch(ipv6)))
        assert_error(
            await refused(open_watch(ipv6)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS",
        )
    finally:
        close_all(held)
        await ipv4.close()
        await ipv6.close()


async def test_streams_end_at_their_maximum_age_and_free_their_slot(
    server_factory: ServerFactory,
) -> None:
    """AUTH_STREAM_MAX_AGE: an idle Watch (a coroutine handler) and an idle reflection
    stream (an async generator) end with UNAVAILABLE / STREAM_MAX_AGE, and their slots
    come back; unary calls are not cut."""
    server = await server_factory(stream_max_age=0.5, max_streams_per_peer=1)
    channel = own_connection(server.address)
    try:
        watch = await eventually(lambda: open_watch(channel))
        await ends_at_max_age(watch.read())
        reflection = await eventually(lambda: open_reflection(channel))
        await ends_at_max_age(reflection.read())
        await eventually(lambda: open_watch(channel))
        await unary_calls_are_served_from(server, channel)
    finally:
        await channel.close()


async def ends_at_max_age(reading: Awaitable[object]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(reading, ANSWERED_WITHIN)
    assert_error(caught.value, grpc.StatusCode.UNAVAILABLE, "STREAM_MAX_AGE")


async def test_a_stream_closed_by_the_client_gives_its_slot_back_at_once(
    server_factory: ServerFactory,
) -> None:
    """Many open-and-cancel cycles with a budget of one stream: no slot leaks."""
    server = await server_factory(max_streams_per_peer=1, max_streams=1)
    channel = own_connection(server.address)
    try:
        for _ in range(30):
            call = await eventually(lambda: open_watch(channel))
            call.cancel()
            reflection = await eventually(lambda: open_reflection(channel))
            await reflection.done_writing()
            assert await reflection.read() is grpc.aio.EOF
        budget = server.running.stream_budget
        for _ in range(int(ANSWERED_WITHIN / 0.05)):  # the last cancel reaches the server
            if not budget.open_streams:
                break
            await asyncio.sleep(0.05)
        assert budget.open_streams == 0
        assert budget.peers_holding_streams == 0
    finally:
        await channel.close()


# --- the budgets as plain objects ---


def test_peer_address_groups_connections_of_one_address() -> None:
    assert peer_address("ipv4:10.1.2.3:5555") == "ipv4:10.1.2.3"
    assert peer_address("ipv4:10.1.2.3:6666") == "ipv4:10.1.2.3"
    # IPv6: one /64 is one peer (a host usually gets a whole /64 to pick addresses from).
    assert peer_address("ipv6:%5B2001:db8:1:2::1%5D:5555") == "ipv6:2001:db8:1:2::/64"
    assert peer_address("ipv6:[2001:db8:1:2:ffff::9]:7") == "ipv6:2001:db8:1:2::/64"
    assert peer_address("ipv6:%5B2001:db8:1:3::1%5D:5555") == "ipv6:2001:db8:1:3::/64"
    assert peer_address("ipv6:%5B::ffff:10.1.2.3%5D:80") == "ipv4:10.1.2.3"
    # A link-local address's zone does not make another peer.
    assert peer_address("ipv6:%5Bfe80::1%25eth0%5D:80") == "ipv6:fe80::/64"
    assert peer_address("unix:/run/authsvc.sock") == "unix:/run/authsvc.sock"
    assert peer_address("") == "-"
    assert peer_address("ipv4:not-an-address:1") == "ipv4:not-an-address"


def test_stream_budget_counts_in_all_and_per_peer() -> None:
    budget = StreamBudget(limit=3, per_peer=2, max_age=60.0)
    a1, a2 = budget.open("ipv4:10.0.0.1:1"), budget.open("ipv4:10.0.0.1:2")
    with pytest.raises(TooManyStreamsFromPeer):
        budget.open("ipv4:10.0.0.1:3")
    b1 = budget.open("ipv4:10.0.0.2:1")
    with pytest.raises(TooManyStreams):
        budget.open("ipv4:10.0.0.3:1")
    assert (budget.open_streams, budget.peers_holding_streams) == (3, 2)
    budget.close(a1)
    budget.close(b1)
    assert (budget.open_streams, budget.peers_holding_streams) == (1, 1)
    budget.close(a2)
    # Nothing is kept for a peer without streams: memory follows open streams only.
    assert (budget.open_streams, budget.peers_holding_streams) == (0, 0)
    for _ in range(2):
        budget.open("ipv4:10.0.0.3:1")


def test_unary_budget_refuses_beyond_its_limit() -> None:
    budget = UnaryBudget(limit=2)
    budget.enter()
    budget.enter()
    with pytest.raises(TooManyCalls):
        budget.enter()
    budget.leave()
    budget.enter()
    assert budget.in_progress == 2


def test_stream_settings_are_parsed_strictly() -> None:
    settings = Settings.from_env(
        {
            "AUTH_MAX_STREAMS": "50",
            "AUTH_MAX_STREAMS_PER_PEER": "5",
            "AUTH_STREAM_MAX_AGE": "120.5",
        }
    )
    assert (settings.max_streams, settings.max_streams_per_peer) == (50, 5)
    assert settings.stream_max_age == 120.5
    defaults = Settings.from_env({})
    assert defaults.max_streams_per_peer < defaults.max_streams
    for name, value in (
        ("AUTH_MAX_STREAMS", "0"),
        ("AUTH_MAX_STREAMS_PER_PEER", "-1"),
        ("AUTH_MAX_STREAMS_PER_PEER", "many"),
        ("AUTH_STREAM_MAX_AGE", "0"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


# --- a streaming RPC added later gets the same protection ---

FUTURE_SERVICE = "auth.v1.AdminService"  # a guarded group ("admin"), as a future stream may be
SERVICE_SECRET = "s" * 40


def _raw(data: bytes) -> bytes:
    return data


@contextlib.asynccontextmanager
async def future_streams_server(settings: Settings) -> AsyncIterator[grpc.aio.Channel]:
    """A server with two streaming methods the service does not have yet (an async
    generator and a coroutine writing through its context), behind the interceptors
    `service.server` installs, in the same order."""

    async def generated(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield f"for {calling_service(context)}".encode()
        await asyncio.Event().wait()  # then idle, like a feed with nothing new

    async def written(request: bytes, context: Any) -> None:
        await context.write(f"for {calling_service(context)}".encode())
        await asyncio.Event().wait()

    handlers = {
        name: grpc.unary_stream_rpc_method_handler(
            behavior, request_deserializer=_raw, response_serializer=_raw
        )
        for name, behavior in (("WatchGenerated", generated), ("WatchWritten", written))
    }
    directory = ServiceDirectory(
        [
            KnownService(
                "feeds",
                frozenset({"admin"}),
                token_digest=hashlib.sha256(SERVICE_SECRET.encode()).digest(),
            )
        ]
    )
    server = grpc.aio.server(
        interceptors=[
            CallBudgetInterceptor(
                UnaryBudget(settings.max_concurrent_rpcs),
                StreamBudget(
                    limit=settings.max_streams,
                    per_peer=settings.max_streams_per_peer,
                    max_age=settings.stream_max_age,
                ),
            ),
            CallerAuthInterceptor(directory=directory, guarded=frozenset({"admin"})),
        ],
        options=transport_options(settings),
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(FUTURE_SERVICE, handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = own_connection(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


async def open_feed(
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes],
) -> grpc.aio.UnaryStreamCall[bytes, bytes]:
    call = watch(b"", metadata=(("authorization", f"Bearer {SERVICE_SECRET}"),))
    assert await call.read() == b"for feeds"
    return call


async def test_a_future_streaming_rpc_gets_the_stream_budget_and_the_caller_check() -> None:
    """No name is listed anywhere: a new server-streaming method (either handler style) is
    held to the caller check of its group and to the stream budget by its kind alone."""
    settings = Settings(max_streams_per_peer=1, stream_max_age=0.5)
    async with future_streams_server(settings) as channel:
        for name in ("WatchGenerated", "WatchWritten"):
            watch = channel.unary_stream(
                f"/{FUTURE_SERVICE}/{name}",
                request_serializer=_raw,
                response_deserializer=_raw,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch(b"", timeout=ANSWERED_WITHIN).read()
            assert_error(
                caught.value, grpc.StatusCode.UNAUTHENTICATED, "SERVICE_CREDENTIALS_REQUIRED"
            )

            feed = await eventually(functools.partial(open_feed, watch))
            assert_error(
                await refused(open_feed(watch)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_STREAMS_FROM_PEER",
            )
            # It ends at its maximum age, and its slot goes to the next method's stream.
            await ends_at_max_age(feed.read())


async def test_a_closed_unary_budget_refuses_with_unavailable_and_waits_for_calls_in_flight() -> (
    None
):
    budget = UnaryBudget(limit=2)
    budget.enter()
    closing = asyncio.create_task(budget.close(within=5.0, quiet=0.01))
    await asyncio.sleep(0.05)
    with pytest.raises(ShuttingDown) as refused:
        budget.enter()
    assert refused.value.code == "UNAVAILABLE"
    assert not closing.done()  # the call in flight is still running
    budget.leave()
    async with asyncio.timeout(2):  # liveness only
        await closing
    assert budget.in_progress == 0
    # Refusals of a stop are counted for one line at its end, not logged as over budget.
    assert budget.refused_while_closed == 1
