"""Prometheus metrics: the `Telemetry` the domain calls, a gRPC interceptor that counts
calls and their latency, a sampler for values that are cheaper to read than to track,
and the HTTP `/metrics` endpoint.

Which process imports what, and when
------------------------------------
prometheus-client chooses how metric values are stored once, when `prometheus_client`
is first imported: in memory, or (if the environment variable PROMETHEUS_MULTIPROC_DIR
is set at that moment) in per-process mmap files in that directory, which any process
can sum. So the variable must be in a process's environment before anything imports
this module or prometheus_client, and only a process started afterwards (`exec`, not
`fork`) can rely on that.

* One process (`authsvc serve`, and the tests): the variable is not set; values live in
  memory. Build one `PrometheusTelemetry()`, hand it to the domain, add
  `MetricsInterceptor(telemetry)` to `grpc.aio.server(interceptors=...)`, run
  `sample_forever(...)` as a task, and serve `telemetry.registry` with
  `MetricsEndpoint.start(listen, telemetry.registry)`; `close()` it on the way out.

* The `--workers` supervisor: it records nothing itself, it only reads the workers'
  files, and `MultiProcessCollector` reads them whatever value class the supervisor's
  own prometheus_client chose. So its own import order does not matter; what matters
  is that, before the first worker is spawned, it has
    1. `path = prepare_multiprocess_dir(<a directory private to this supervisor>)`,
    2. set `os.environ[MULTIPROC_DIR_VARIABLE] = str(path)` (workers copy os.environ),
  then it serves `MetricsEndpoint.start(listen, multiprocess_registry(path))`, calls
  `worker_exited(pid, path)` for every worker that exits (so that worker's gauges drop
  out of the totals; its counters stay counted), and closes the endpoint on exit.
  It must not create a `PrometheusTelemetry` (that would add a process to the totals).

* A worker (`serve --worker`): a fresh interpreter started with the variable already
  in its environment, so its first import of prometheus_client chooses the mmap files
  (`multiprocess_enabled()` says so). It builds exactly one `PrometheusTelemetry` (two
  in one process would share, and overwrite, the same file entries) and wires it like
  the single process, but starts no `MetricsEndpoint`: the supervisor owns that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.domain.telemetry import LoginOutcome, ReplayVerdict, RevocationTarget

__all__ = [
    "DEFAULT_ENDPOINT_LIMITS",
    "DURATION_BUCKETS",
    "MULTIPROC_DIR_VARIABLE",
    "EndpointLimits",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "OwnedMultiprocessDir",
    "ProcessSample",
    "PrometheusTelemetry",
    "RpcMetrics",
    "multiprocess_enabled",
    "multiprocess_registry",
    "prepare_multiprocess_dir",
    "remove_abandoned_multiprocess_dirs",
    "sample_forever",
    "worker_exited",
]

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"

# From a cached Validate (well under a millisecond) to a login that waits for a
# hashing thread and the database (seconds when overloaded).
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

_LOGIN_OUTCOMES: Final[tuple[LoginOutcome, ...]] = ("succeeded", "failed", "throttled")
_REPLAY_VERDICTS: Final[tuple[ReplayVerdict, ...]] = ("retry", "suspicious")
_REVOCATION_TARGETS: Final[tuple[RevocationTarget, ...]] = (
    "refresh_token",
    "access_token",
    "session",
    "subject",
    "admin",
    "reuse",
)


def multiprocess_enabled() -> bool:
    """Whether this process's metric values go to files in PROMETHEUS_MULTIPROC_DIR
    (decided when prometheus_client was first imported, not by the current env)."""
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


class RpcMetrics:
    """The label children of one gRPC method, bound once: recording a call costs one
    dict lookup (its status code) and two metric updates, no `.labels()` call."""

    __slots__ = ("_by_code", "_calls", "_duration", "_method")

    def __init__(self, calls: Counter, duration: Histogram, method: str) -> None:
        self._calls = calls
        self._method = method
        self._duration = duration.labels(method=method)
        self._by_code: dict[grpc.StatusCode, Counter] = {
            grpc.StatusCode.OK: calls.labels(method=method, code=grpc.StatusCode.OK.name)
        }

    def finished(self, code: grpc.StatusCode, seconds: float) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._calls.labels(method=self._method, code=code.name)
            self._by_code[code] = child
        child.inc()
        self._duration.observe(seconds)


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """Values read from the process's state now and then (see `sample_forever`)."""

    cache_hits: int
    """Cumulative, as counted by VerifiedTokenCache."""
    cache_misses: int
    """Cumulative, as counted by VerifiedTokenCache."""
    revoked_sessions: int
    """len(RevocationState)."""
    revocation_lag_seconds: float | None
    """Commit time to applied here, of the latest revocation applied (None: none yet)."""
    revocation_listener_up: bool
    pool_in_use: int
    pool_idle: int
    pool_max: int


class PrometheusTelemetry:
    """`service.domain.telemetry.Telemetry` backed by prometheus-client metrics.

    The metrics are registered in `registry` (a fresh one by default, so several
    servers in one test process do not clash on names). In multiprocess mode the
    registry only matters for `describe`; values are written to the process's files.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._rpc_calls = Counter(
            "authsvc_rpc_calls",
            "gRPC calls handled, by full method name and final status code.",
            ("method", "code"),
            registry=r,
        )
        self._rpc_duration = Histogram(
            "authsvc_rpc_duration_seconds",
            "Time spent in the handler of a gRPC call, by full method name.",
            ("method",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        logins = Counter(
            "authsvc_logins",
            "Login attempts by outcome (succeeded, failed, throttled).",
            ("outcome",),
            registry=r,
        )
        # Children bound up front: every series is exported (as 0) from the start, so
        # rate() sees its first increase, and the domain's calls skip .labels().
        self._logins: dict[str, Counter] = {o: logins.labels(outcome=o) for o in _LOGIN_OUTCOMES}
        self._logins_metric = logins
        self._reuse = Counter(
            "authsvc_refresh_reuse_detected",
            "Refresh tokens presented again after rotation (their session is revoked).",
            registry=r,
        )
        replays = Counter(
            "authsvc_refresh_replays",
            "Rotated refresh tokens presented again within the grace window (answered with "
            "the same child), by verdict: retry (same address, within a second) or "
            "suspicious.",
            ("verdict",),
            registry=r,
        )
        self._replays: dict[str, Counter] = {v: replays.labels(verdict=v) for v in _REPLAY_VERDICTS}
        revoked = Counter(
            "authsvc_sessions_revoked",
            "Sessions revoked, by what the revocation named.",
            ("target",),
            registry=r,
        )
        self._revoked: dict[str, Counter] = {
            t: revoked.labels(target=t) for t in _REVOCATION_TARGETS
        }
        self._revoked_metric = revoked
        self._rotations = Counter(
            "authsvc_signing_key_rotations",
            "Signing-key rotations performed by this service.",
            registry=r,
        )
        # One series per janitor step (a table, or key upkeep, or a whole pass that could
        # not start): created on first use.
        self._janitor_deleted = Counter(
            "authsvc_janitor_deleted",
            "Rows the janitor deleted, by table.",
            ("table",),
            registry=r,
        )
        self._janitor_failures = Counter(
            "authsvc_janitor_failures",
            "Janitor steps that failed (a timeout, a lock held too long, the database "
            "gone), by table; the other tables' clean-up goes on.",
            ("table",),
            registry=r,
        )
        self._cache_hits = Counter(
            "authsvc_token_cache_hits",
            "Validate calls answered from the verified-token cache.",
            registry=r,
        )
        self._cache_misses = Counter(
            "authsvc_token_cache_misses",
            "Validate calls that had to verify the token's signature.",
            registry=r,
        )
        # The live* modes: the supervisor's mark_process_dead drops a dead worker's
        # value, instead of a crashed worker's last value pinning the aggregate.
        self._revocation_lag = Gauge(
            "authsvc_revocation_lag_seconds",
            "Delay from a revocation's commit to this process applying it (latest seen; "
            "the largest over workers).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._listener_up = Gauge(
            "authsvc_revocation_listener_up",
            "1 if revocations are heard live (LISTEN), 0 if not (in any worker).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._revoked_sessions = Gauge(
            "authsvc_revoked_sessions",
            "Revoked sessions held in memory for Validate (the largest over workers).",
            registry=r,
            multiprocess_mode="livemax",
        )
        pool = Gauge(
            "authsvc_db_pool_connections",
            "Database pool connections by state (in_use, idle), summed over workers.",
            ("state",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self._pool_in_use = pool.labels(state="in_use")
        self._pool_idle = pool.labels(state="idle")
        self._pool_max = Gauge(
            "authsvc_db_pool_max_connections",
            "Database pool size limit, summed over workers.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._rpc: dict[str, RpcMetrics] = {}
        self._last_hits = 0
        self._last_misses = 0

    # --- Telemetry (called by the domain) ---

    def login(self, outcome: LoginOutcome) -> None:
        child = self._logins.get(outcome)
        if child is None:  # not one of the Literal's values: still counted, never lost
            child = self._logins[outcome] = self._logins_metric.labels(outcome=outcome)
        child.inc()

    def refresh_reuse_detected(self) -> None:
        self._reuse.inc()

    def refresh_replayed(self, verdict: ReplayVerdict) -> None:
        self._replays[verdict].inc()

    def sessions_revoked(self, target: RevocationTarget, count: int) -> None:
        if count <= 0:  # Counter.inc refuses negative amounts; zero changes nothing
            return
        child = self._revoked.get(target)
        if child is None:
            child = self._revoked[target] = self._revoked_metric.labels(target=target)
        child.inc(count)

    def signing_key_rotated(self) -> None:
        self._rotations.inc()

    def janitor_deleted(self, table: str, count: int) -> None:
        if count > 0:
            self._janitor_deleted.labels(table=table).inc(count)

    def janitor_failed(self, table: str) -> None:
        self._janitor_failures.labels(table=table).inc()

    # --- gRPC calls (called by MetricsInterceptor) ---

    def rpc(self, method: str) -> RpcMetrics:
        """The bound metrics of one full method name (created on first use)."""
        metrics = self._rpc.get(method)
        if metrics is None:
            metrics = self._rpc[method] = RpcMetrics(self._rpc_calls, self._rpc_duration, method)
        return metrics

    # --- sampled values ---

    def record_sample(self, sample: ProcessSample) -> None:
        """Set the gauges, and add the cache counts made since the previous sample."""
        self._cache_hits.inc(_delta(sample.cache_hits, self._last_hits))
        self._cache_misses.inc(_delta(sample.cache_misses, self._last_misses))
        self._last_hits = sample.cache_hits
        self._last_misses = sample.cache_misses
        self._revoked_sessions.set(sample.revoked_sessions)
        if sample.revocation_lag_seconds is not None:
            # Commit time is the database's clock, applied time ours: they may disagree
            # by a little, never below zero.
            self._revocation_lag.set(max(0.0, sample.revocation_lag_seconds))
        self._listener_up.set(1 if sample.revocation_listener_up else 0)
        self._pool_in_use.set(sample.pool_in_use)
        self._pool_idle.set(sample.pool_idle)
        self._pool_max.set(sample.pool_max)


def _delta(current: int, previous: int) -> int:
    # A count below the previous one means the source was replaced (a new cache):
    # everything it counted is new.
    return current - previous if current >= previous else max(current, 0)


async def sample_forever(
    telemetry: PrometheusTelemetry,
    take_sample: Callable[[], ProcessSample],
    interval: float = 1.0,
) -> None:
    """Record a sample every `interval` seconds until cancelled; a failing sample is
    logged (once per run of failures) and retried, never ends the loop."""
    failing = False
    while True:
        try:
            telemetry.record_sample(take_sample())
        except Exception:
            if not failing:
                log.warning("taking a metrics sample failed; will retry", exc_info=True)
            failing = True
        else:
            failing = False
        await asyncio.sleep(interval)


_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts unary-unary calls by method and final status code, and times them.

    Streaming handlers (health Watch, reflection) pass through untouched, and so do
    unknown methods (no handler), which would otherwise let any caller add label values.
    """

    def __init__(self, telemetry: PrometheusTelemetry) -> None:
        self._telemetry = telemetry
        # grpc.aio runs interceptors on every call: wrap each handler once and reuse the
        # wrapper while the server hands out the same handler object.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails],
            Awaitable[grpc.RpcMethodHandler[_TRequest, _TResponse] | None],
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[_TRequest, _TResponse] = cached[1]
            return wrapped
        wrapped = self._wrap(self._telemetry.rpc(method), handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(
        metrics: RpcMetrics, handler: grpc.RpcMethodHandler[_TRequest, _TResponse]
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse]:
        if handler.unary_unary is None:
            return handler
        # Typed by the stubs for the sync server; grpc.aio passes its own context.
        inner: Callable[..., Any] = handler.unary_unary
        clock = time.perf_counter

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = clock()
            try:
                response = await inner(request, context)
            except asyncio.CancelledError:
                metrics.finished(_code_when_cancelled(context), clock() - started)
                raise
            except Exception:
                metrics.finished(_code_when_raised(context), clock() - started)
                raise
            metrics.finished(_code_when_returned(context), clock() - started)
            return response

        def sync_behavior(request: Any, context: Any) -> Any:
            started = clock()
            # The context grpc.aio gives a plain function has no code(): watch the calls.
            watched = _CodeWatchingContext(context)
            try:
                response = inner(request, watched)
            except Exception:
                metrics.finished(_code_when_raised(watched), clock() - started)
                raise
            metrics.finished(_code_when_returned(watched), clock() - started)
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


# --- exposition ---


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """What one `/metrics` client may hold of the endpoint. Scrapers send a short head
    and read a short answer; anything slower or larger is cut off, so a flood of
    connections costs the server a bounded number of sockets and no threads."""

    max_connections: int = 32
    """Connections served at once; one more is closed as soon as it is accepted."""
    head_timeout: float = 5.0
    """Seconds to send the whole request head (not per read: trickling does not help)."""
    max_head_bytes: int = 8192
    """Request line and headers; a longer head is answered 431."""
    answer_timeout: float = 10.0
    """Seconds to render and take the answer once the head is in."""


DEFAULT_ENDPOINT_LIMITS: Final = EndpointLimits()

# After a rendering that took d seconds, the next waits until 3d have passed: a flood of
# scrapes gets the rendering at most a quarter of the time, and every scrape still gets
# values read after it arrived.
_RENDER_PAUSE_FACTOR: Final = 3.0
_HEAD_END: Final = b"\r\n\r\n"


def _response(
    status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", *extra: str
) -> bytes:
    head = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _MetricsHttp:
    """The HTTP/1.1 side of `MetricsEndpoint`, run on the endpoint's own event loop: one
    request per connection, answered and closed."""

    def __init__(self, registry: CollectorRegistry, limits: EndpointLimits) -> None:
        self._registry = registry
        self._limits = limits
        self._open: set[asyncio.StreamWriter] = set()
        self._render_lock = asyncio.Lock()
        self._latest: tuple[str, float, bytes] | None = None
        """(content type, when its rendering started, the text) of the latest rendering."""
        self._next_render_at = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._limits.max_connections:
            writer.transport.abort()
            return
        self._open.add(writer)
        try:
            answer = await self._answer(reader)
            if answer is not None:
                async with asyncio.timeout(self._limits.answer_timeout):
                    writer.write(answer)
                    await writer.drain()
                writer.close()
        except (OSError, TimeoutError):
            pass  # the client went away or was too slow: nothing to tell it
        finally:
            self._open.discard(writer)
            if not writer.is_closing():
                writer.transport.abort()

    def abort_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to send, or None to just close (no complete head in time)."""
        try:
            async with asyncio.timeout(self._limits.head_timeout):
                head = await reader.readuntil(_HEAD_END)
        except asyncio.LimitOverrunError:
            return _response("431 Request Header Fields Too Large", b"request head too large\n")
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        lines = head[: -len(_HEAD_END)].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"not an HTTP/1.x request\n")
        method, target, _ = parts
        if method != "GET":
            return _response(
                "405 Method Not Allowed", b"only GET\n", "text/plain; charset=utf-8", "Allow: GET"
            )
        if target.partition("?")[0] not in ("/metrics", "/metrics/"):
            return _response("404 Not Found", b"not found; metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            async with asyncio.timeout(self._limits.answer_timeout):
                body, content_type = await self._render(accept)
        except TimeoutError:
            raise
        except Exception:
            log.exception("rendering the metrics failed")
            return _response("500 Internal Server Error", b"rendering the metrics failed\n")
        return _response("200 OK", body, content_type)

    async def _render(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (Prometheus text by default). One
        rendering at a time: scrapes that arrived before one started share it."""
        encoder, content_type = choose_encoder(accept)
        asked_at = time.monotonic()
        async with self._render_lock:
            latest = self._latest
            if latest is not None and latest[0] == content_type and latest[1] >= asked_at:
                return latest[2], content_type
            pause = self._next_render_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            started = time.monotonic()
            body = encoder(self._registry)
            finished = time.monotonic()
            self._latest = (content_type, started, body)
            self._next_render_at = finished + _RENDER_PAUSE_FACTOR * (finished - started)
            return body, content_type


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"metrics listen address must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (":PORT" means every interface)
    return host, int(port_text)


class MetricsEndpoint:
    """HTTP GET /metrics for a registry, served by an asyncio loop in one thread of its own
    (so neither the gRPC loop nor the supervisor's watch loop serves it), within `limits`."""

    def __init__(self, registry: CollectorRegistry, limits: EndpointLimits) -> None:
        self._registry = registry
        self._limits = limits
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.host: str = ""
        self.port: int = 0
        """The bound port (the real one when asked for port 0)."""

    @classmethod
    def start(
        cls,
        listen: str,
        registry: CollectorRegistry,
        *,
        limits: EndpointLimits = DEFAULT_ENDPOINT_LIMITS,
    ) -> MetricsEndpoint:
        """Bind `listen` ("HOST:PORT", IPv6 host in brackets, port 0 for any) and serve.

        Raises OSError if the address cannot be bound.
        """
        host, port = _split_listen(listen)
        endpoint = cls(registry, limits)
        thread = threading.Thread(
            target=asyncio.run,
            args=(endpoint._serve(host, port),),
            name="metrics-http",
            daemon=True,
        )
        endpoint._thread = thread
        thread.start()
        endpoint._started.wait()
        if endpoint._failure is not None:
            thread.join()
            raise endpoint._failure
        return endpoint

    async def _serve(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        http = _MetricsHttp(self._registry, self._limits)
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server = await asyncio.start_server(
                http.handle, host, port, family=family, limit=self._limits.max_head_bytes
            )
        except Exception as exc:  # handed to start()'s caller
            self._failure = exc
            self._started.set()
            return
        bound = server.sockets[0].getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        self._started.set()
        async with server:
            await self._stop.wait()
            server.close()
            http.abort_all()

    def close(self) -> None:
        """Stop serving, drop open connections and release the port."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has finished already
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5.0)


# --- multiprocess mode (the --workers supervisor) ---


_OWNED_DIR_PREFIX: Final = "authsvc-metrics-"
_STAGING_DIR_PREFIX: Final = ".authsvc-metrics-staging-"
_OWNER_LOCK: Final = ".owner.lock"


class OwnedMultiprocessDir:
    """A supervisor's private metrics directory, `authsvc-metrics-*` in the temporary
    directory, locked (flock) for as long as its supervisor lives. A supervisor killed
    with SIGKILL cannot remove it; the lock then dies with it, which is how the next
    start (`remove_abandoned_multiprocess_dirs`) tells it from a live supervisor's,
    whatever the process ids (another PID namespace may share /tmp)."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, parent: Path | None = None) -> OwnedMultiprocessDir:
        parent = Path(tempfile.gettempdir() if parent is None else parent)
        # Locked before it gets the name the clean-up looks for: never seen unlocked.
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_DIR_PREFIX, dir=parent))
        lock_fd = os.open(staging / _OWNER_LOCK, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            path = parent / (_OWNED_DIR_PREFIX + staging.name.removeprefix(_STAGING_DIR_PREFIX))
            staging.rename(path)
        except BaseException:
            os.close(lock_fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(prepare_multiprocess_dir(path), lock_fd)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def remove_abandoned_multiprocess_dirs(parent: Path | None = None) -> list[Path]:
    """Delete the metrics directories of supervisors that are gone (killed with SIGKILL,
    say): this user's `authsvc-metrics-*` whose lock nobody holds. Returns them."""
    parent = Path(tempfile.gettempdir() if parent is None else parent)
    removed = []
    for path in parent.glob(_OWNED_DIR_PREFIX + "*"):
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
                continue
            lock_fd = os.open(path / _OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # not one of ours (or not ours to judge)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its supervisor is alive
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(lock_fd)
    if removed:
        log.warning("removed metrics directories of supervisors that are gone: %s", removed)
    return removed


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create `path` if needed and delete the metric files a previous run left there
    (only `*.db`: the directory may hold other things); returns it made absolute."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return path


def multiprocess_registry(path: Path | None = None) -> CollectorRegistry:
    """A registry that sums every process's files in `path` (default: the directory in
    PROMETHEUS_MULTIPROC_DIR) at each scrape; works in any process."""
    registry = CollectorRegistry()
    directory = None if path is None else str(path)
    # prometheus_client leaves MultiProcessCollector and mark_process_dead unannotated.
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def worker_exited(pid: int, path: Path | None = None) -> None:
    """Drop the gauges of a worker that has exited (its counters stay in the totals)."""
    if path is None and MULTIPROC_DIR_VARIABLE not in os.environ:
        return  # not in multiprocess mode: nothing to drop
    directory = None if path is None else str(path)
    mark_process_dead(pid, path=directory)  # type: ignore[no-untyped-call]
