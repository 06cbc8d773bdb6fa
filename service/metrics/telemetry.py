"""`PrometheusTelemetry`: the metrics the domain counts (`service.domain.telemetry.Telemetry`),
the per-method call metrics `MetricsInterceptor` records, and the values sampled from the
process's state now and then (`ProcessSample`, `sample_forever`). docs/operations.md,
"Metrics", lists them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.domain.telemetry import LoginOutcome, ReplayVerdict, RevocationTarget

log = logging.getLogger(__name__)

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
    "session_limit",
)


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
    revocation_log_sequence: int = 0
    """The revocation log position applied here."""
    revocation_watchers: int = 0
    """WatchRevocations streams open now."""
    watch_updates_sent: int = 0
    """Cumulative, WatchRevocations updates written (heartbeats included)."""
    watchers_cut_off: int = 0
    """Cumulative, WatchRevocations streams cut off as too slow."""


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
        self._clock_skew = Gauge(
            "authsvc_clock_skew_seconds",
            "This host's wall clock minus the database's (positive: ahead); the service "
            "itself runs on the database's time. One series per worker (label pid).",
            registry=r,
            # Signed: no max, min or sum of readings is the skew (the max hid a clock
            # behind), and each worker re-sets its last reading at every sample, so "most
            # recent" would be any worker's. Every live worker's own reading, then.
            multiprocess_mode="liveall",
        )
        self._clock_measured_ago = Gauge(
            "authsvc_clock_measured_seconds_ago",
            "Seconds since the database's clock was last read successfully (the offset in "
            "use is this old; it grows while the database is unreachable). The largest over "
            "workers.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._log_sequence = Gauge(
            "authsvc_revocation_log_sequence",
            "The revocation log position this process has applied (the smallest over "
            "workers); compare replicas, or with the database's head, to see one behind.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self._watchers = Gauge(
            "authsvc_revocation_watchers",
            "WatchRevocations streams open, summed over workers.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._watch_updates = Counter(
            "authsvc_revocation_watch_updates",
            "WatchRevocations updates sent (heartbeats included).",
            registry=r,
        )
        self._watchers_cut_off = Counter(
            "authsvc_revocation_watchers_cut_off",
            "WatchRevocations streams ended because their client did not keep up "
            "(RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW).",
            registry=r,
        )
        self._rpc: dict[str, RpcMetrics] = {}
        self._last_hits = 0
        self._last_misses = 0
        self._last_updates = 0
        self._last_cut_off = 0

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
        self._log_sequence.set(sample.revocation_log_sequence)
        self._watchers.set(sample.revocation_watchers)
        self._watch_updates.inc(_delta(sample.watch_updates_sent, self._last_updates))
        self._watchers_cut_off.inc(_delta(sample.watchers_cut_off, self._last_cut_off))
        self._last_updates = sample.watch_updates_sent
        self._last_cut_off = sample.watchers_cut_off
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
