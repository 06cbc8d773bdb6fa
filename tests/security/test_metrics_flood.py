"""A flood of half-open `GET /metrics` connections (a few bytes of a request head, then
silence) against a real `authsvc serve`, single process and `--workers` supervisor: the
server's thread count stays bounded, Validate answers, a normal scrape works again once
the flood's connections time out, and SIGTERM still stops the process."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.loadtest.server_process import ServeCommand, serving
from service.metrics import EndpointLimits, MetricsEndpoint
from tests.live_server import PASSWORD
from tests.test_cli import _server_env
from tests.test_replicas import _create_user

FLOOD = 3_000
"""Half-open connections per wave (the number in the operator's report)."""
HALF_A_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x"


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """Two waves of FLOOD sockets must fit this process's descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * FLOOD + 1_000
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@contextlib.contextmanager
def _serve(env: dict[str, str], workers: int) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`authsvc serve --workers N` with metrics on; yields (process, gRPC port, metrics port).
    Killed afterwards if the test left it running."""
    with serving(ServeCommand(env, workers=workers), at_end="kill") as server:
        assert server.metrics_port is not None, "server printed no metrics address"
        yield server.process, server.port, server.metrics_port


async def _half_open(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that each send part of a request head and then nothing; the
    ones the server refused or closed are not returned (they are not errors)."""
    gate = asyncio.Semaphore(200)  # connection attempts in flight at once

    async def one() -> asyncio.StreamWriter | None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), timeout=10
                )
                writer.write(HALF_A_HEAD)
                await asyncio.wait_for(writer.drain(), timeout=10)
            except (OSError, TimeoutError):
                return None
            return writer

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return [w for w in opened if w is not None]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body.decode()


def _threads(pid: int) -> int:
    return int(psutil.Process(pid).num_threads())


async def _scrape_eventually(port: int, within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        try:
            return await asyncio.to_thread(_scrape, port)
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.system
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "supervisor"])
async def test_half_open_metrics_flood_does_not_pin_the_server(
    database_url: str, tmp_path: Path, workers: int
) -> None:
    env = _server_env(database_url, tmp_path, AUTH_METRICS_LISTEN="127.0.0.1:0")
    _create_user(env, "flood")
    with _serve(env, workers) as (proc, port, metrics_port):
        assert "authsvc_token_cache_misses_total" in await asyncio.to_thread(_scrape, metrics_port)
        threads_before = _threads(proc.pid)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            issued = await stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username="flood", password=PASSWORD)
                ),
                timeout=30,
            )
            writers = await _half_open(metrics_port, FLOOD)
            try:
                await asyncio.sleep(1.0)
                # One thread per connection would be thousands here.
                threads = _threads(proc.pid)
                assert threads <= threads_before + 4, (threads_before, threads)
                verdict = await stub.Validate(
                    auth_pb2.ValidateRequest(access_token=issued.tokens.access_token), timeout=5
                )
                assert verdict.valid
                # The flood's connections time out; then a scrape is served again.
                text = await _scrape_eventually(metrics_port, within=30)
                assert "authsvc_rpc_calls_total" in text
            finally:
                for writer in writers:
                    writer.transport.abort()
        # A second wave, still open when SIGTERM arrives.
        writers = await _half_open(metrics_port, FLOOD)
        try:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0
        finally:
            for writer in writers:
                writer.transport.abort()


# --- each limit of the endpoint, on an in-process endpoint with small limits ---

SMALL = EndpointLimits(max_connections=4, head_timeout=1.0, max_head_bytes=512, answer_timeout=5.0)


class _CountingCollector(Collector):
    """One gauge whose value is the number of times it was collected (optionally slow)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.collected = 0
        self._delay = delay

    def collect(self) -> Iterator[Metric]:
        time.sleep(self._delay)  # rendering is CPU work on the endpoint's thread
        self.collected += 1
        yield GaugeMetricFamily("test_collections", "times collected", value=self.collected)


@pytest.fixture
def small_endpoint() -> Iterator[tuple[MetricsEndpoint, _CountingCollector]]:
    registry = CollectorRegistry()
    collector = _CountingCollector()
    registry.register(collector)
    endpoint = MetricsEndpoint.start("127.0.0.1:0", registry, limits=SMALL)
    try:
        yield endpoint, collector
    finally:
        endpoint.close()


async def _exchange(port: int, request: bytes, within: float = 5.0) -> bytes:
    """Send `request`, read until the server closes; what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read()
    finally:
        writer.transport.abort()


@pytest.mark.system  # a flood of held connections
async def test_a_connection_over_the_cap_takes_the_place_of_the_oldest_without_a_head(
    small_endpoint: tuple[MetricsEndpoint, _CountingCollector],
) -> None:
    """At the cap, a new connection does not wait for a slot: the oldest connection that has
    not sent its whole head yet is closed for it (a scraper sends its head at once; only a
    client holding connections idle loses one)."""
    endpoint, _ = small_endpoint
    held = []
    for _ in range(SMALL.max_connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(HALF_A_HEAD)
        held.append((reader, writer))
        await asyncio.sleep(0.01)  # in this order
    try:
        await asyncio.sleep(0.2)
        answer = await _exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"test_collections" in answer
        # The oldest held connection was closed for it, long before the head timeout.
        async with asyncio.timeout(SMALL.head_timeout / 2):
            with contextlib.suppress(ConnectionResetError):
                assert await held[0][0].read() == b""
        with pytest.raises(TimeoutError):  # the next oldest still waits for its head
            async with asyncio.timeout(0.3):
                await held[1][0].read()
    finally:
        for _, writer in held:
            writer.transport.abort()


@pytest.mark.system  # a client that keeps the endpoint full of idle connections
async def test_a_scraper_gets_through_while_one_client_holds_every_slot_idle(
    small_endpoint: tuple[MetricsEndpoint, _CountingCollector],
) -> None:
    """Found by an outside review: 32 idle connections, each reopened as the server dropped
    it, made every scrape fail for as long as the client liked (0 of 60)."""
    endpoint, _ = small_endpoint
    held: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()

    async def keep_full() -> None:
        while not stop.is_set():
            held[:] = [w for w in held if not w.transport.is_closing()]
            while len(held) < SMALL.max_connections:
                _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
                held.append(writer)
            await asyncio.sleep(0.01)

    holder = asyncio.create_task(keep_full())
    try:
        await asyncio.sleep(0.3)
        answers = [
            await _exchange(endpoint.port, b"GET /metrics HTTP/1.1\r\n\r\n", within=3)
            for _ in range(5)
        ]
    finally:
        stop.set()
        await asyncio.wait_for(holder, timeout=5)
        for writer in held:
            writer.transport.abort()
    assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)


@pytest.mark.system  # a slow client against a timeout
async def test_a_trickled_request_head_is_cut_off_at_the_head_timeout(
    small_endpoint: tuple[MetricsEndpoint, _CountingCollector],
) -> None:
    endpoint, collector = small_endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    started = time.monotonic()
    closed_after = None
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nX: ")
        # One byte every 0.1 s: each read is prompt, the head never ends.
        while time.monotonic() - started < 4 * SMALL.head_timeout:
            writer.write(b"x")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    if await reader.read(1) == b"":
                        closed_after = time.monotonic() - started
                        break
    except ConnectionResetError:
        closed_after = time.monotonic() - started
    finally:
        writer.transport.abort()
    assert closed_after is not None, "the server kept a trickling client"
    assert closed_after < 3 * SMALL.head_timeout
    assert collector.collected == 0


async def test_a_request_head_over_the_limit_is_answered_431(
    small_endpoint: tuple[MetricsEndpoint, _CountingCollector],
) -> None:
    endpoint, collector = small_endpoint
    answer = await _exchange(
        endpoint.port,
        b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * (2 * SMALL.max_head_bytes) + b"\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 431 ")
    # Just under the limit is served.
    padding = b"a" * (SMALL.max_head_bytes - 100)
    answer = await _exchange(
        endpoint.port, b"GET /metrics HTTP/1.1\r\nX-Padding: " + padding + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert collector.collected == 1


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", b"200"),
        (b"GET / HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /metrics/../admin HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400"),
    ],
)
async def test_only_get_metrics_is_answered(
    small_endpoint: tuple[MetricsEndpoint, _CountingCollector], request_head: bytes, status: bytes
) -> None:
    endpoint, _ = small_endpoint
    answer = await _exchange(endpoint.port, request_head)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    assert b"\r\nConnection: close\r\n" in answer
    if status == b"405":
        assert b"\r\nAllow: GET\r\n" in answer


@pytest.mark.system  # a flood of scrapes
async def test_concurrent_scrapes_share_renderings_and_each_sees_fresh_values() -> None:
    registry = CollectorRegistry()
    collector = _CountingCollector(delay=0.1)
    registry.register(collector)
    endpoint = MetricsEndpoint.start("127.0.0.1:0", registry, limits=SMALL)
    try:
        scrapes = 20
        # More concurrent scrapes than connection slots: some are turned away and retry.
        texts = await asyncio.gather(
            *(_scrape_eventually(endpoint.port, within=30) for _ in range(scrapes))
        )
        assert all("test_collections" in t for t in texts)
        assert collector.collected < scrapes / 2, collector.collected
        # One after another, each scrape reads the values again.
        seen = [_collections(await _scrape_eventually(endpoint.port, within=5)) for _ in range(3)]
        assert seen[0] < seen[1] < seen[2]
    finally:
        endpoint.close()


def _collections(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "test_collections":
            return float(family.samples[0].value)
    raise AssertionError("test_collections missing")


def test_stopping_with_connections_open_logs_no_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop (SIGTERM) while half-open connections are held ends their handlers before the
    endpoint's loop closes: no "Exception in callback" traceback per connection."""
    endpoint = MetricsEndpoint.start("127.0.0.1:0", CollectorRegistry())
    held = []
    try:
        for _ in range(20):
            conn = socket.create_connection((endpoint.host, endpoint.port))
            conn.sendall(b"GET /met")
            held.append(conn)
        time.sleep(0.3)
    finally:
        endpoint.close()
        for conn in held:
            conn.close()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text[:2000]
