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
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Final, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.domain.telemetry import LoginOutcome, RevocationTarget

__all__ = [
    "DURATION_BUCKETS",
    "MULTIPROC_DIR_VARIABLE",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "ProcessSample",
    "PrometheusTelemetry",
    "RpcMetrics",
    "multiprocess_enabled",
    "multiprocess_registry",
    "prepare_multiprocess_dir",
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
    clock_skew_seconds: float | None = None
    """This host's wall clock minus the database's, at the last reading (None: the
    process does not run on the database's clock)."""
    clock_measured_seconds_ago: float | None = None
    """Age of the database-clock offset in use (grows while the database is away)."""


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
        self._clock_skew = Gauge(
            "authsvc_clock_skew_seconds",
            "This host's wall clock minus the database's (positive: ahead); the service "
            "itself runs on the database's time. The largest over workers.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._clock_measured_ago = Gauge(
            "authsvc_clock_measured_seconds_ago",
            "Seconds since the database's clock was last read successfully (the offset in "
            "use is this old; it grows while the database is unreachable). The largest over "
            "workers.",
            registry=r,
            multiprocess_mode="livemax",
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

    def sessions_revoked(self, target: RevocationTarget, count: int) -> None:
        if count <= 0:  # Counter.inc refuses negative amounts; zero changes nothing
            return
        child = self._revoked.get(target)
        if child is None:
            child = self._revoked[target] = self._revoked_metric.labels(target=target)
        child.inc(count)

    def signing_key_rotated(self) -> None:
        self._rotations.inc()

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
            # Both times are the database's clock as each replica measures it: they may
            # disagree by a few milliseconds, never below zero.
            self._revocation_lag.set(max(0.0, sample.revocation_lag_seconds))
        self._listener_up.set(1 if sample.revocation_listener_up else 0)
        self._pool_in_use.set(sample.pool_in_use)
        self._pool_idle.set(sample.pool_idle)
        self._pool_max.set(sample.pool_max)
        if sample.clock_skew_seconds is not None:
            self._clock_skew.set(sample.clock_skew_seconds)
        if sample.clock_measured_seconds_ago is not None:
            self._clock_measured_ago.set(sample.clock_measured_seconds_ago)


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


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A slow scraper must not hold up others or the process exit.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr is noise


def _only_metrics_path(app: WSGIApplication) -> WSGIApplication:
    def metrics_only(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; metrics are at /metrics\n"]

    return metrics_only


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"metrics listen address must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (":PORT" means every interface)
    return host, int(port_text)


class MetricsEndpoint:
    """HTTP GET /metrics for a registry, served by a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = server.server_port
        """The bound port (the real one when asked for port 0)."""

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
        """Bind `listen` ("HOST:PORT", IPv6 host in brackets, port 0 for any) and serve.

        Raises OSError if the address cannot be bound.
        """
        host, port = _split_listen(listen)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]

        class Server(_ThreadingWSGIServer):
            address_family = family

        server = make_server(
            host,
            port,
            _only_metrics_path(make_wsgi_app(registry)),
            server_class=Server,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(
            # A short poll interval so close() returns quickly.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="metrics-http",
            daemon=True,
        )
        thread.start()
        return cls(server, thread)

    def close(self) -> None:
        """Stop serving and release the port (blocks for at most about 0.05 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


# --- multiprocess mode (the --workers supervisor) ---


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
