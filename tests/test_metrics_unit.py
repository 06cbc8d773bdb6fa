"""service.metrics on its own: the interceptor on a tiny grpc.aio server, the domain
counters, sampled values, and the HTTP endpoint. No database."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.domain.telemetry import Telemetry
from service.metrics import (
    MetricsEndpoint,
    MetricsInterceptor,
    ProcessSample,
    PrometheusTelemetry,
    sample_forever,
)

SERVICE = "test.Probe"
Context = grpc.aio.ServicerContext[bytes, bytes]

# Every metric as exposed (a counter with its _total suffix).
EXPOSED_NAMES = (
    "authsvc_rpc_calls_total",
    "authsvc_rpc_duration_seconds_bucket",
    "authsvc_logins_total",
    "authsvc_refresh_reuse_detected_total",
    "authsvc_refresh_replays_total",
    "authsvc_sessions_revoked_total",
    "authsvc_signing_key_rotations_total",
    "authsvc_token_cache_hits_total",
    "authsvc_token_cache_misses_total",
    "authsvc_revocation_lag_seconds",
    "authsvc_revocation_listener_up",
    "authsvc_revoked_sessions",
    "authsvc_db_pool_connections",
    "authsvc_db_pool_max_connections",
)


def same_bytes(data: bytes) -> bytes:
    return data


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def calls(registry: CollectorRegistry, name: str, code: str) -> float | None:
    return value(registry, "authsvc_rpc_calls_total", method=method(name), code=code)


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `check()` holds (for what the server records after the client is done)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def sample(**overrides: Any) -> ProcessSample:
    fields: dict[str, Any] = {
        "cache_hits": 0,
        "cache_misses": 0,
        "revoked_sessions": 0,
        "revocation_lag_seconds": None,
        "revocation_listener_up": True,
        "pool_in_use": 0,
        "pool_idle": 0,
        "pool_max": 10,
    }
    fields.update(overrides)
    return ProcessSample(**fields)


# --- a tiny server whose methods end in each way a handler can end ---


@dataclass
class Probe:
    telemetry: PrometheusTelemetry
    channel: grpc.aio.Channel
    slow_started: asyncio.Event

    def unary(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(
            method(name), request_serializer=same_bytes, response_deserializer=same_bytes
        )

    async def call(self, name: str, request: bytes = b"x", deadline: float = 5.0) -> bytes:
        return await self.unary(name)(request, timeout=deadline)

    async def code_of(self, name: str) -> grpc.StatusCode:
        try:
            await self.call(name)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK


def probe_handlers(slow_started: asyncio.Event) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    async def ok(request: bytes, context: Context) -> bytes:
        return b"ok:" + request

    async def abort(request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    async def abort_with_status(request: bytes, context: Context) -> bytes:
        status = status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message="who?")
        await context.abort_with_status(rpc_status.to_status(status))

    async def set_code(request: bytes, context: Context) -> bytes:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("none here")
        return b""

    async def set_code_then_raise(request: bytes, context: Context) -> bytes:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        raise RuntimeError("after set_code")

    async def raise_(request: bytes, context: Context) -> bytes:
        raise ValueError("bug")

    async def slow(request: bytes, context: Context) -> bytes:
        slow_started.set()
        await asyncio.sleep(30)
        return b"late"

    def plain(request: bytes, context: Context) -> bytes:
        return b"plain:" + request

    # Plain functions run in grpc.aio's thread pool with a context that has no code().
    def plain_set_code(request: bytes, context: Any) -> bytes:
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        return b""

    def plain_abort(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        raise AssertionError("abort returned")

    def plain_raise(request: bytes, context: Any) -> bytes:
        raise KeyError("bug")

    async def stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    # A custom deserializer and serializer, as add_auth_servicer has: the wrapped
    # handler must keep them (requests arrive upper-cased, responses leave with a "!").
    # Bytes, not str: grpc encodes a str response itself before the serializer sees it.
    def unary(behavior: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=bytes.upper,
            response_serializer=lambda data: data + b"!",
        )

    return {
        "Ok": unary(ok),
        "Abort": unary(abort),
        "AbortWithStatus": unary(abort_with_status),
        "SetCode": unary(set_code),
        "SetCodeThenRaise": unary(set_code_then_raise),
        "Raise": unary(raise_),
        "Slow": unary(slow),
        "Plain": unary(plain),
        "PlainSetCode": unary(plain_set_code),
        "PlainAbort": unary(plain_abort),
        "PlainRaise": unary(plain_raise),
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=bytes.upper,
            response_serializer=lambda data: data + b"!",
        ),
    }


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    telemetry = PrometheusTelemetry()
    slow_started = asyncio.Event()
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(telemetry)],
        # Where grpc.aio runs plain-function handlers.
        migration_thread_pool=ThreadPoolExecutor(max_workers=2),
    )
    handlers = probe_handlers(slow_started)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # As add_auth_servicer does: registered handlers too (they must still be intercepted).
    server.add_registered_method_handlers(SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Probe(telemetry=telemetry, channel=channel, slow_started=slow_started)
    finally:
        await channel.close()
        await server.stop(None)


async def test_interceptor_counts_calls_by_final_status_and_times_them(probe: Probe) -> None:
    registry = probe.telemetry.registry
    assert await probe.call("Ok", b"hi") == b"ok:HI!"
    assert await probe.call("Ok", b"again") == b"ok:AGAIN!"
    assert await probe.call("Plain", b"p") == b"plain:P!"
    expected = {
        "Abort": grpc.StatusCode.PERMISSION_DENIED,
        "AbortWithStatus": grpc.StatusCode.UNAUTHENTICATED,
        "SetCode": grpc.StatusCode.NOT_FOUND,
        "SetCodeThenRaise": grpc.StatusCode.FAILED_PRECONDITION,
        "Raise": grpc.StatusCode.UNKNOWN,
        "PlainSetCode": grpc.StatusCode.ALREADY_EXISTS,
        "PlainAbort": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PlainRaise": grpc.StatusCode.UNKNOWN,
    }
    for name, code in expected.items():
        # What the client received is what the metric says. (A plain function's abort()
        # sends the status before the function has returned: wait for the count.)
        assert await probe.code_of(name) == code, name
        await eventually(lambda: calls(registry, name, code.name) == 1.0)  # noqa: B023
        assert calls(registry, name, "OK") == 0.0, name
    assert calls(registry, "Ok", "OK") == 2.0
    assert calls(registry, "Plain", "OK") == 1.0
    # One latency observation per call, whatever its outcome.
    duration = "authsvc_rpc_duration_seconds"
    for name, count in [("Ok", 2.0), ("Plain", 1.0), *((n, 1.0) for n in expected)]:
        assert value(registry, f"{duration}_count", method=method(name)) == count, name
    ok_sum = value(registry, f"{duration}_sum", method=method("Ok"))
    assert ok_sum is not None
    assert 0.0 < ok_sum < 1.0
    assert value(registry, f"{duration}_bucket", method=method("Ok"), le="5.0") == 2.0


async def test_streaming_and_unknown_methods_are_not_counted(probe: Probe) -> None:
    stream = probe.channel.unary_stream(
        method("Stream"), request_serializer=same_bytes, response_deserializer=same_bytes
    )(b"s", timeout=5.0)
    assert [item async for item in stream] == [b"a!", b"b!"]
    assert await probe.code_of("Missing") == grpc.StatusCode.UNIMPLEMENTED
    sampled = {
        s.labels.get("method")
        for family in probe.telemetry.registry.collect()
        for s in family.samples
        if s.name.startswith("authsvc_rpc_")
    }
    assert sampled == set()


async def test_deadline_and_cancellation_are_counted(probe: Probe) -> None:
    registry = probe.telemetry.registry
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await probe.call("Slow", deadline=0.2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server learns of the deadline on its own schedule.
    await eventually(lambda: calls(registry, "Slow", "DEADLINE_EXCEEDED") == 1.0)

    probe.slow_started.clear()
    call = probe.unary("Slow")(b"x", timeout=30.0)
    await asyncio.wait_for(probe.slow_started.wait(), 5.0)
    call.cancel()
    await eventually(lambda: calls(registry, "Slow", "CANCELLED") == 1.0)
    assert calls(registry, "Slow", "DEADLINE_EXCEEDED") == 1.0
    assert value(registry, "authsvc_rpc_duration_seconds_count", method=method("Slow")) == 2.0


@dataclass
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


async def test_interceptor_wraps_each_handler_once() -> None:
    interceptor = MetricsInterceptor(PrometheusTelemetry())
    handlers = probe_handlers(asyncio.Event())

    def continuation_for(
        handler: grpc.RpcMethodHandler[Any, Any] | None,
    ) -> Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]:
        async def continuation(
            details: grpc.HandlerCallDetails,
        ) -> grpc.RpcMethodHandler[Any, Any] | None:
            return handler

        return continuation

    ok = handlers["Ok"]
    first = await interceptor.intercept_service(continuation_for(ok), Details(method("Ok")))
    again = await interceptor.intercept_service(continuation_for(ok), Details(method("Ok")))
    assert first is not None
    assert first is not ok
    assert again is first  # no new wrapper per call
    assert first.request_deserializer is ok.request_deserializer
    assert first.response_serializer is ok.response_serializer
    # A different handler object under the same name (a re-registered service) is wrapped anew.
    other = handlers["Plain"]
    replaced = await interceptor.intercept_service(continuation_for(other), Details(method("Ok")))
    assert replaced is not first
    stream = handlers["Stream"]
    details = Details(method("Stream"))
    assert await interceptor.intercept_service(continuation_for(stream), details) is stream
    assert await interceptor.intercept_service(continuation_for(None), details) is None


def test_domain_counters() -> None:
    telemetry = PrometheusTelemetry()
    as_protocol: Telemetry = telemetry  # mypy checks the structural match
    registry = telemetry.registry
    # Known label values are exported as 0 before anything happens.
    for outcome in ("succeeded", "failed", "throttled"):
        assert value(registry, "authsvc_logins_total", outcome=outcome) == 0.0
    assert value(registry, "authsvc_sessions_revoked_total", target="reuse") == 0.0
    as_protocol.login("failed")
    as_protocol.login("failed")
    as_protocol.login("succeeded")
    as_protocol.refresh_reuse_detected()
    as_protocol.refresh_replayed("retry")
    as_protocol.refresh_replayed("suspicious")
    as_protocol.refresh_replayed("suspicious")
    as_protocol.sessions_revoked("subject", 3)
    as_protocol.sessions_revoked("reuse", 1)
    as_protocol.sessions_revoked("session", 0)  # nothing revoked: nothing counted, no error
    as_protocol.signing_key_rotated()
    assert value(registry, "authsvc_logins_total", outcome="failed") == 2.0
    assert value(registry, "authsvc_logins_total", outcome="succeeded") == 1.0
    assert value(registry, "authsvc_logins_total", outcome="throttled") == 0.0
    assert value(registry, "authsvc_refresh_reuse_detected_total") == 1.0
    assert value(registry, "authsvc_refresh_replays_total", verdict="retry") == 1.0
    assert value(registry, "authsvc_refresh_replays_total", verdict="suspicious") == 2.0
    assert value(registry, "authsvc_sessions_revoked_total", target="subject") == 3.0
    assert value(registry, "authsvc_sessions_revoked_total", target="reuse") == 1.0
    assert value(registry, "authsvc_sessions_revoked_total", target="session") == 0.0
    assert value(registry, "authsvc_signing_key_rotations_total") == 1.0


def test_each_telemetry_has_its_own_registry() -> None:
    first, second = PrometheusTelemetry(), PrometheusTelemetry()  # no duplicate-name error
    first.login("failed")
    assert value(first.registry, "authsvc_logins_total", outcome="failed") == 1.0
    assert value(second.registry, "authsvc_logins_total", outcome="failed") == 0.0
    shared = CollectorRegistry()
    PrometheusTelemetry(registry=shared)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusTelemetry(registry=shared)


def test_record_sample_sets_gauges_and_adds_cache_deltas() -> None:
    telemetry = PrometheusTelemetry()
    registry = telemetry.registry
    telemetry.record_sample(
        sample(
            cache_hits=5,
            cache_misses=2,
            revoked_sessions=7,
            revocation_lag_seconds=0.25,
            revocation_listener_up=True,
            pool_in_use=3,
            pool_idle=1,
            pool_max=10,
        )
    )
    assert value(registry, "authsvc_token_cache_hits_total") == 5.0
    assert value(registry, "authsvc_token_cache_misses_total") == 2.0
    assert value(registry, "authsvc_revoked_sessions") == 7.0
    assert value(registry, "authsvc_revocation_lag_seconds") == 0.25
    assert value(registry, "authsvc_revocation_listener_up") == 1.0
    assert value(registry, "authsvc_db_pool_connections", state="in_use") == 3.0
    assert value(registry, "authsvc_db_pool_connections", state="idle") == 1.0
    assert value(registry, "authsvc_db_pool_max_connections") == 10.0

    # Only what happened since the previous sample is added; no lag seen keeps the last one.
    telemetry.record_sample(
        sample(cache_hits=8, cache_misses=2, revocation_listener_up=False, pool_idle=4)
    )
    assert value(registry, "authsvc_token_cache_hits_total") == 8.0
    assert value(registry, "authsvc_token_cache_misses_total") == 2.0
    assert value(registry, "authsvc_revocation_lag_seconds") == 0.25
    assert value(registry, "authsvc_revocation_listener_up") == 0.0
    assert value(registry, "authsvc_revoked_sessions") == 0.0
    assert value(registry, "authsvc_db_pool_connections", state="in_use") == 0.0
    assert value(registry, "authsvc_db_pool_connections", state="idle") == 4.0

    # Counts that went down come from a new cache: all of them are new.
    telemetry.record_sample(sample(cache_hits=3, cache_misses=1))
    assert value(registry, "authsvc_token_cache_hits_total") == 11.0
    assert value(registry, "authsvc_token_cache_misses_total") == 3.0


async def test_sample_forever_survives_failing_samples() -> None:
    telemetry = PrometheusTelemetry()
    attempts = 0

    def take_sample() -> ProcessSample:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise RuntimeError("pool not ready")
        return sample(revoked_sessions=attempts)

    task = asyncio.create_task(sample_forever(telemetry, take_sample, interval=0.01))
    registry = telemetry.registry
    await eventually(lambda: (value(registry, "authsvc_revoked_sessions") or 0.0) >= 4.0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def fetch(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return response.status, response.headers["Content-Type"], body.decode()


@pytest.fixture
def endpoint() -> Iterator[tuple[MetricsEndpoint, PrometheusTelemetry]]:
    telemetry = PrometheusTelemetry()
    started = MetricsEndpoint.start("127.0.0.1:0", telemetry.registry)
    try:
        yield started, telemetry
    finally:
        started.close()


async def test_endpoint_serves_metrics_on_any_port(
    endpoint: tuple[MetricsEndpoint, PrometheusTelemetry],
) -> None:
    server, telemetry = endpoint
    assert server.port > 0
    telemetry.rpc("/auth.v1.AuthService/Validate").finished(grpc.StatusCode.UNAUTHENTICATED, 0.01)
    telemetry.login("failed")
    telemetry.login("failed")
    status, content_type, text = await asyncio.to_thread(
        fetch, f"http://127.0.0.1:{server.port}/metrics"
    )
    assert status == 200
    assert content_type.startswith("text/plain")
    for name in EXPOSED_NAMES:
        assert f"\n{name}" in text, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    validate = ("method", "/auth.v1.AuthService/Validate")
    assert samples[("authsvc_rpc_calls_total", (("code", "UNAUTHENTICATED"), validate))] == 1.0
    assert samples[("authsvc_logins_total", (("outcome", "failed"),))] == 2.0


async def test_endpoint_answers_404_elsewhere_and_close_frees_the_port(
    endpoint: tuple[MetricsEndpoint, PrometheusTelemetry],
) -> None:
    server, _ = endpoint
    with pytest.raises(urllib.error.HTTPError) as raised:
        await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/")
    assert raised.value.code == 404
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/metrics")
    # The port can be bound again at once.
    again = MetricsEndpoint.start(f"127.0.0.1:{server.port}", CollectorRegistry())
    try:
        assert again.port == server.port
    finally:
        again.close()


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:http", "127.0.0.1"])
def test_endpoint_rejects_a_listen_without_port(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        MetricsEndpoint.start(listen, CollectorRegistry())


@pytest.mark.parametrize("wildcard", ["[::]", "[0:0:0:0:0:0:0:0]"])
async def test_endpoint_on_the_ipv6_wildcard_answers_ipv4_too(wildcard: str) -> None:
    """`[::]` takes both families, as AUTH_LISTEN's gRPC listener does (asyncio alone
    would bind IPv6 only). Binds the wildcard, but connects over loopback only."""
    endpoint = MetricsEndpoint.start(f"{wildcard}:0", CollectorRegistry())
    try:
        for host in ("127.0.0.1", "[::1]"):
            status, _, _ = await asyncio.to_thread(fetch, f"http://{host}:{endpoint.port}/metrics")
            assert status == 200, host
    finally:
        endpoint.close()


async def test_endpoint_on_ipv6_loopback_answers_there() -> None:
    endpoint = MetricsEndpoint.start("[::1]:0", CollectorRegistry())
    try:
        assert endpoint.address.host == "::1"
        status, _, _ = await asyncio.to_thread(fetch, f"http://[::1]:{endpoint.port}/metrics")
        assert status == 200
    finally:
        endpoint.close()
