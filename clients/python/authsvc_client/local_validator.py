"""Validate without a round trip: authsvc's answer, computed in this process.

    validator = LocalValidator("authsvc:50051", service_token=..., audience="orders")
    await validator.start()                      # returns once the first snapshot is in
    answer = validator.validate(token, required_scopes=("orders:write",))   # no I/O
    answer = await validator.validate_async(token)   # the same, or authsvc's Validate if stale
    await validator.close()

It follows authsvc's WatchRevocations stream (the JWK Set, every revoked session and user,
heartbeats), reconnects with jittered exponential backoff and resumes from the last sequence
it applied. While it has heard from authsvc within `max_staleness` seconds it answers from
memory, exactly as the server's Validate would (token_check.py); past that it is stale:
`validate` answers VERIFIER_STALE, `validate_async` asks authsvc's Validate (or, with
`fail_closed=True`, answers VERIFIER_STALE too). Guarantees, failure modes, metrics:
docs/clients.md, "LocalValidator".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc_client.client import AuthClient, AuthServiceError, Validation
from authsvc_client.gen.auth.v1 import auth_pb2
from authsvc_client.limited_log import LogRateLimiter
from authsvc_client.token_check import (
    Checked,
    KeySet,
    Revocations,
    TokenChecker,
    check_request,
    invalid,
)

log = logging.getLogger(__name__)

__all__ = ["VERIFIER_STALE", "LocalValidator"]

VERIFIER_STALE = "VERIFIER_STALE"
"""The `error` of an answer this process could not give from memory (see the module doc)."""

DEFAULT_ISSUER = "authsvc"
"""authsvc's default AUTH_ISSUER. The stream does not carry the issuer: pass `issuer=` if
your authsvc sets another."""

# How often revocations past their keep_until are forgotten (a scan of the whole set).
_PRUNE_INTERVAL = 30.0
# Tokens naming a key this process has not been told of yet (a rotation whose update is
# on its way) are asked of authsvc, at most this many at once; beyond, the local answer
# (BAD_SIGNATURE) stands, so made-up key ids cannot turn into unbounded calls.
_MAX_UNKNOWN_KID_CALLS = 4


class _ProtocolError(Exception):
    """The stream said something the protocol does not allow; reconnect."""


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


class LocalValidator:
    """authsvc's Validate in this process, kept current by WatchRevocations.

    - `target`: authsvc's address (as for AuthClient), or `client=` an AuthClient to share
      (its channel, credentials and service token; not closed by `close()`).
    - `channel_credentials`, `service_token`: as AuthClient's `credentials` and
      `service_token` (the service token is sent on the stream and on Validate).
    - `max_staleness`: seconds without any update or heartbeat after which answers no
      longer come from memory.
    - `audience`: the audience `validate` requires when called without one.
    - `fail_closed`: when stale, `validate_async` answers VERIFIER_STALE instead of asking
      authsvc's Validate.
    - `issuer`, `leeway`: authsvc's AUTH_ISSUER and AUTH_LEEWAY (the stream carries
      neither); the defaults are authsvc's defaults.
    - `cache_size`: tokens whose signature verified, remembered (bounded LRU) so that a hot
      token skips the signature check; every other check runs on every call.
    - `validate_timeout`: the deadline of a fallback Validate when the call gives none.
    - `clock` (epoch seconds, for exp/iat/nbf), `monotonic` (for staleness), `rng`: tests.
    """

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        client: AuthClient | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        service_token: str | None = None,
        max_staleness: float = 5.0,
        audience: str | None = None,
        fail_closed: bool = False,
        issuer: str = DEFAULT_ISSUER,
        leeway: float = 0.0,
        cache_size: int = 100_000,
        validate_timeout: float = 2.0,
        initial_backoff: float = 0.05,
        max_backoff: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if (target is None) == (client is None):
            raise ValueError("give exactly one of target and client")
        if max_staleness <= 0 or validate_timeout <= 0:
            raise ValueError("max_staleness and validate_timeout must be positive")
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError("backoffs: 0 < initial_backoff <= max_backoff")
        if client is None:
            assert target is not None
            client = AuthClient(
                target=target, credentials=channel_credentials, service_token=service_token
            )
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._max_staleness = max_staleness
        self._audience = audience or ""
        self._fail_closed = fail_closed
        self._validate_timeout = validate_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._checker = TokenChecker(
            issuer=issuer, leeway=leeway, clock=clock, cache_size=cache_size
        )
        self._limited_log = LogRateLimiter(log, window=60.0, now=monotonic)
        self._synced = False  # a snapshot has been applied
        self._pending: _PendingSnapshot | None = None  # a snapshot whose last part is due
        self._unsupported = False  # authsvc answered WatchRevocations UNIMPLEMENTED
        self._heard_at: float | None = None
        self._pruned_at = monotonic()
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._unknown_kid_calls = 0
        # Metrics: plain numbers, read at will (also `metrics()`, `register_prometheus()`).
        self.sequence = 0
        """The log position the revocations held here are at."""
        self.updates_applied = 0
        self.snapshots_applied = 0
        self.snapshot_parts = 0
        """Updates received that belong to a snapshot (one per snapshot unless split)."""
        self.heartbeats = 0
        self.reconnects = 0
        self.local_answers = 0
        self.fallbacks = 0
        """Calls to authsvc's Validate made because this validator was stale."""
        self.unknown_kid_fallbacks = 0
        self.stale_answers = 0
        """VERIFIER_STALE answers given."""

    @classmethod
    def from_client(cls, client: AuthClient, **options: Any) -> LocalValidator:
        """A validator sharing `client` (its channel and service token)."""
        return cls(client=client, **options)

    def __repr__(self) -> str:
        return (
            f"LocalValidator(client={self._client!r}, sequence={self.sequence}, fresh={self.fresh})"
        )

    # --- state ------------------------------------------------------------------------

    @property
    def staleness(self) -> float:
        """Seconds since authsvc was last heard from (inf before the first update)."""
        if self._heard_at is None:
            return math.inf
        return max(0.0, self._monotonic() - self._heard_at)

    @property
    def fresh(self) -> bool:
        """Whether answers come from memory: a snapshot is in and authsvc was heard from
        within `max_staleness`."""
        return self._synced and not self._unsupported and self.staleness <= self._max_staleness

    @property
    def unsupported(self) -> bool:
        """authsvc does not serve WatchRevocations (an older server): every answer is stale."""
        return self._unsupported

    @property
    def revoked_sessions(self) -> int:
        return len(self._checker.revocations.sessions)

    @property
    def revoked_users(self) -> int:
        return len(self._checker.revocations.users)

    def is_session_revoked(self, session_id: str) -> bool:
        """Whether this session is in the revoked set held here (for tests and audits)."""
        return session_id in self._checker.revocations.sessions

    def held(self) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
        """Copies of what is held, for audits (the soak compares them with the database):
        revoked session id -> keep_until, and revoked subject -> (generation, keep_until)
        (epoch seconds)."""
        revocations = self._checker.revocations
        return dict(revocations.sessions), dict(revocations.users)

    def metrics(self) -> dict[str, float]:
        """Every counter and gauge, by name."""
        return {
            "staleness_seconds": self.staleness,
            "fresh": float(self.fresh),
            "sequence": float(self.sequence),
            "updates_applied": float(self.updates_applied),
            "snapshots_applied": float(self.snapshots_applied),
            "snapshot_parts": float(self.snapshot_parts),
            "heartbeats": float(self.heartbeats),
            "reconnects": float(self.reconnects),
            "local_answers": float(self.local_answers),
            "fallbacks": float(self.fallbacks),
            "unknown_kid_fallbacks": float(self.unknown_kid_fallbacks),
            "stale_answers": float(self.stale_answers),
            "revoked_sessions": float(self.revoked_sessions),
            "revoked_users": float(self.revoked_users),
            "verified_cache_entries": float(self._checker.cached),
            "verified_cache_hits": float(self._checker.cache_hits),
            "verified_cache_misses": float(self._checker.cache_misses),
        }

    def register_prometheus(
        self, registry: Any = None, *, prefix: str = "authsvc_local_validator"
    ) -> bool:
        """Export `metrics()` through prometheus_client if it is installed (it is not a
        dependency); whether it was. Read at each scrape; `registry` defaults to
        prometheus_client's global REGISTRY."""
        try:
            from prometheus_client import REGISTRY
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
            )
        except ImportError:
            return False
        counters = {
            "updates_applied",
            "snapshots_applied",
            "snapshot_parts",
            "heartbeats",
            "reconnects",
            "local_answers",
            "fallbacks",
            "unknown_kid_fallbacks",
            "stale_answers",
            "verified_cache_hits",
            "verified_cache_misses",
        }
        validator = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                for name, value in validator.metrics().items():
                    full = f"{prefix}_{name}"
                    if name in counters:
                        yield CounterMetricFamily(full, f"LocalValidator {name}", value=value)
                    else:
                        yield GaugeMetricFamily(full, f"LocalValidator {name}", value=value)

        (registry if registry is not None else REGISTRY).register(_Collector())
        return True

    # --- answers ------------------------------------------------------------------------

    def validate(
        self, token: str, required_scopes: Sequence[str] = (), audience: str | None = None
    ) -> Validation:
        """authsvc's Validate answer for this token, from memory, no I/O. `audience` None
        means the validator's own; "" checks none. VERIFIER_STALE when stale (see
        `validate_async` for an answer then). A request authsvc would refuse
        (empty or oversized token, bad scopes) raises AuthServiceError INVALID_ARGUMENT,
        as AuthClient.validate does."""
        wanted = self._audience if audience is None else audience
        check_request(token, required_scopes, wanted)
        if not self.fresh:
            return self._stale_answer()
        return self._local(token, required_scopes, wanted).validation

    async def validate_async(
        self,
        token: str,
        required_scopes: Sequence[str] = (),
        audience: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> Validation:
        """`validate`, except that when stale (or the token names a key not heard of yet)
        it asks authsvc's Validate instead, unless `fail_closed`. Failures of that call
        raise AuthServiceError (as AuthClient.validate)."""
        wanted = self._audience if audience is None else audience
        check_request(token, required_scopes, wanted)
        if self.fresh:
            checked = self._local(token, required_scopes, wanted)
            if not checked.unknown_kid or self._unknown_kid_calls >= _MAX_UNKNOWN_KID_CALLS:
                return checked.validation
            # A key rotated in a moment ago whose update is still on its way: ask.
            self.unknown_kid_fallbacks += 1
            self._unknown_kid_calls += 1
            try:
                return await self._remote(token, required_scopes, wanted, timeout)
            finally:
                self._unknown_kid_calls -= 1
        if self._fail_closed:
            return self._stale_answer()
        self.fallbacks += 1
        if not self._unsupported:  # that one was said once, when the stream was refused
            self._limited_log.warning(
                ("fallback",),
                "LocalValidator stale (%s); asking authsvc's Validate",
                self._why_stale(),
            )
        return await self._remote(token, required_scopes, wanted, timeout)

    def _local(self, token: str, required_scopes: Sequence[str], audience: str) -> Checked:
        self.local_answers += 1
        checked = self._checker.check(token, required_scopes, audience)
        if checked.wrong_issuer:
            self._limited_log.error(
                ("issuer",),
                "tokens signed by authsvc's keys carry another issuer than %r: "
                "pass LocalValidator(issuer=...) = authsvc's AUTH_ISSUER",
                self._checker.issuer,
            )
        return checked

    async def _remote(
        self,
        token: str,
        required_scopes: Sequence[str],
        audience: str,
        timeout: float | None,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
    ) -> Validation:
        return await self._client.validate(
            token,
            required_scopes=required_scopes,
            audience=audience,
            timeout=self._validate_timeout if timeout is None else timeout,
        )

    def _stale_answer(self) -> Validation:
        self.stale_answers += 1
        self._limited_log.warning(
            ("stale",), "LocalValidator stale (%s): answering VERIFIER_STALE", self._why_stale()
        )
        return invalid(VERIFIER_STALE)

    def _why_stale(self) -> str:
        if self._unsupported:
            return "authsvc does not serve WatchRevocations"
        if not self._synced:
            return "no snapshot yet"
        return f"nothing heard for {self.staleness:.1f} s"

    # --- following the stream -----------------------------------------------------------

    def start_in_background(self) -> None:
        """Start following the stream (idempotent) without waiting for the snapshot; until
        it is in, answers are stale. Needs a running event loop."""
        if self._closed:
            raise RuntimeError("LocalValidator is closed")
        if self._task is None:
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name="authsvc-watch-revocations"
            )

    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a wait bound)
        """Start following and return once the first snapshot is in. TimeoutError if none
        came within `timeout` (it keeps trying in the background; answers are stale until
        then); AuthServiceError UNIMPLEMENTED if authsvc does not serve WatchRevocations
        (`validate_async` then always asks authsvc's Validate)."""
        self.start_in_background()
        assert self._ready is not None
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no snapshot from authsvc within {timeout} s") from None
        if self._unsupported:
            raise AuthServiceError(
                grpc.StatusCode.UNIMPLEMENTED,
                None,
                "authsvc does not serve WatchRevocations; answers come from its Validate",
            )

    async def close(self) -> None:
        """Stop following (and close the channel if this validator opened it)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> LocalValidator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _backoff(self, attempt: int) -> float:
        """Equal jitter: half the exponential step, plus up to the other half at random."""
        step: float = min(self._max_backoff, self._initial_backoff * 2.0 ** min(attempt - 1, 30))
        return step / 2 + self._rng.uniform(0.0, step / 2)

    async def _follow(self) -> None:
        attempt = 0
        while not self._closed:
            self._pending = None  # the parts of a snapshot cut short are worth nothing
            call = self._client.watch_revocations(self.sequence if self._synced else 0)
            try:
                # `_closed` is looked at on every turn, and the read is bounded with
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a result
                # that came as its task was cancelled and drops the cancellation, and this
                # loop then read on for good while close() waited for it.
                while not self._closed:
                    # A connection that went quiet (no heartbeat) is as good as gone.
                    async with asyncio.timeout(self._max_staleness):
                        update = await call.read()
                    if update is grpc.aio.EOF:
                        self._limited_log.warning(("ended",), "WatchRevocations stream ended")
                        break
                    assert isinstance(update, auth_pb2.RevocationUpdate)
                    self._apply(update)
                    attempt = 0
            except TimeoutError:
                self._limited_log.warning(
                    ("quiet",),
                    "WatchRevocations: nothing for %.1f s; reconnecting",
                    self._max_staleness,
                )
            except grpc.aio.AioRpcError as rpc_error:
                error = AuthServiceError.from_rpc_error(rpc_error)
                if error.code == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning(
                        "authsvc does not serve WatchRevocations: LocalValidator answers "
                        "through authsvc's Validate (VERIFIER_STALE without I/O)"
                    )
                    self._unsupported = True
                    assert self._ready is not None
                    self._ready.set()
                    return
                refused = error.code in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                (self._limited_log.error if refused else self._limited_log.warning)(
                    ("stream", error.code.name, error.reason),
                    "WatchRevocations failed: %s/%s",
                    error.code.name,
                    error.reason,
                )
            except _ProtocolError as problem:
                self._limited_log.error(("protocol",), "WatchRevocations: %s", problem)
            finally:
                call.cancel()
            if self._closed:
                return
            self.reconnects += 1
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    def _apply(self, update: auth_pb2.RevocationUpdate) -> None:
        """One update; everything it changes is swapped in at once (no await inside).

        A snapshot may come in parts (authsvc splits one of more than 10,000 entries): the
        first has `snapshot` set, every part but the last has sequence 0, and the last
        carries the snapshot's sequence. The parts are gathered aside and the snapshot
        replaces what is held only once complete: until then the held state (and its
        staleness) stays as it was, and a stream that ends mid-snapshot leaves it untouched.
        """
        if update.snapshot or self._pending is not None:
            self._apply_snapshot_part(update)
            return
        heartbeat = not (
            update.sequence or update.revoked or update.revoked_users or update.jwks_json
        )
        if heartbeat:
            self.heartbeats += 1
            self._heard_at = self._monotonic()
            return
        if not self._synced:
            raise _ProtocolError("an update before any snapshot")
        if not update.sequence and (update.revoked or update.revoked_users):
            # Only a part of a snapshot carries entries without a sequence.
            raise _ProtocolError("revocations without a sequence outside a snapshot")
        keys = self._keys_of(update)
        revocations = self._checker.revocations
        _add_entries(revocations, update)
        if keys is not None:
            self._checker.set_keys(keys)
        self.sequence = max(self.sequence, update.sequence)
        self._applied(revocations)

    def _apply_snapshot_part(self, update: auth_pb2.RevocationUpdate) -> None:
        if update.snapshot:
            if self._pending is not None:
                raise _ProtocolError("a snapshot began inside another")
            self._pending = _PendingSnapshot()
        pending = self._pending
        assert pending is not None
        self.snapshot_parts += 1
        keys = self._keys_of(update)
        if keys is not None:
            pending.keys = keys
        _add_entries(pending.revocations, update)
        has_entries = bool(update.revoked or update.revoked_users)
        # The last part carries the sequence. The one exception: the snapshot of a log
        # that has never had an entry (position 0) is one part, empty, at sequence 0 (a
        # first part of several is never empty).
        complete = update.sequence != 0 or (update.snapshot and not has_entries)
        if not complete:
            return
        self._pending = None
        if pending.keys is None and self._checker.keys is None:
            raise _ProtocolError("a snapshot without keys")
        if pending.keys is not None:
            self._checker.set_keys(pending.keys)
        self._checker.revocations = pending.revocations
        self.sequence = update.sequence
        self.snapshots_applied += 1
        self._synced = True
        assert self._ready is not None
        self._ready.set()
        self._applied(pending.revocations)

    def _keys_of(self, update: auth_pb2.RevocationUpdate) -> KeySet | None:
        if not update.jwks_json:
            return None
        try:
            keys = KeySet(update.jwks_json)
        except ValueError:
            raise _ProtocolError("an unreadable JWK Set") from None
        if keys.skipped:
            self._limited_log.warning(
                ("keys",), "%d keys of the JWK Set are not usable here", keys.skipped
            )
        return keys

    def _applied(self, revocations: Revocations) -> None:
        self.updates_applied += 1
        self._heard_at = self._monotonic()
        if self._heard_at - self._pruned_at >= _PRUNE_INTERVAL:
            self._pruned_at = self._heard_at
            revocations.prune(self._clock())


class _PendingSnapshot:
    """The parts of a snapshot received so far (applied once the last is in)."""

    def __init__(self) -> None:
        self.revocations = Revocations()
        self.keys: KeySet | None = None


def _add_entries(revocations: Revocations, update: auth_pb2.RevocationUpdate) -> None:
    for session in update.revoked:
        revocations.add_session(session.session_id, _seconds(session.keep_until))
    for user in update.revoked_users:
        revocations.add_user(user.subject, user.generation, _seconds(user.keep_until))
