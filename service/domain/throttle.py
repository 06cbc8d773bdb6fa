"""Brute-force throttling of failed logins, per username and per peer address (IPv4, or an
IPv6 /64), counted in PostgreSQL so that it holds across replicas.

After `free_failures` failed logins within `window`, each further failure makes the key
wait `base_delay * 2**(n - free_failures - 1)` seconds, capped at `max_delay`. Check and
count are one step: an attempt is counted as a failure under the key's row lock before its
password is checked (a reservation) and settled when the check ends, so concurrent guesses
get no more checks than sequential ones; a pending count a dead process leaves behind is
ignored after PENDING_EXPIRY. The rules, the defaults and the known limits: docs/design.md,
"Brute-force throttling".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from service.clock import Clock, to_datetime
from service.domain.events import peer_address
from service.domain.ports import ThrottleStorage
from service.domain.records import ThrottleSettlement, ThrottleState, UserRecord
from service.errors import LoginThrottled

if TYPE_CHECKING:
    from service.settings import Settings


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """How many failures a key gets for free, and how its delays grow."""

    free_failures: int
    base_delay: float = 1.0
    max_delay: float = 900.0
    window: float = 3600.0

    def delay_after(self, failures: int) -> float:
        """Seconds a key must wait after its `failures`-th failure in the window."""
        extra = failures - self.free_failures
        if extra <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(extra - 1, 30))


def user_key(username: str) -> str:
    return "user:" + username


def peer_key(peer: str) -> str:
    """The key of a gRPC peer ("ipv4:192.0.2.7:5000", "ipv6:%5B2001:db8::1%5D:5000"): its
    source (`peer_address`: the IPv4 address, also IPv4-mapped, or the IPv6 /64)."""
    return "peer:" + peer_address(peer)


PENDING_EXPIRY = 60.0
"""Seconds after its latest reservation that a key's pending count is ignored: a
check takes a hash and a few database calls, so only a dead process leaves one."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """One login attempt, counted as a failure against its keys until it is settled."""

    reserved_at: datetime
    failures: dict[str, int]
    """Each key's count of failures, this attempt included."""
    previous_failure_at: dict[str, datetime]


@dataclass(frozen=True, slots=True)
class ReservationDecision:
    """What an attempt does to its keys, found in their rows read under their lock."""

    counts: dict[str, tuple[int, int]] | None
    """Each key's (failures, pending) once the attempt is counted; None: nothing counted."""
    locked_until: datetime | None
    """The latest wait of the keys that must wait, or None."""


def decide_reservation(
    states: list[ThrottleState], policies: Mapping[str, ThrottlePolicy], *, now: float
) -> ReservationDecision:
    """The throttle's rule for one attempt (its keys' `states`, each key's policy): it waits
    while a key is locked; it is not counted (busy) while a key's attempts being checked
    may use up its allowance (taken in turn, this one would come after them); otherwise it
    is counted against every key. A pending count older than PENDING_EXPIRY is ignored,
    failures older than the key's window are forgotten. The store's statement
    (migration 0013) is this rule in SQL, held to it by a differential test."""
    at = to_datetime(now)
    pending_since = to_datetime(now - PENDING_EXPIRY)
    locked_until: list[datetime] = []
    busy = False
    counts = {}
    for state in states:
        policy = policies[state.key]
        fresh = state.pending_at is not None and state.pending_at >= pending_since
        pending = state.pending if fresh else 0
        failures = state.failures
        if state.last_failure_at < to_datetime(now - policy.window):
            failures = 0
        failures = max(failures, pending)
        if state.locked_until is not None and state.locked_until > at:
            locked_until.append(state.locked_until)
        elif failures > policy.free_failures and pending > 0:
            busy = True
        counts[state.key] = (failures + 1, pending + 1)
    return ReservationDecision(
        counts=None if locked_until or busy else counts,
        locked_until=max(locked_until) if locked_until else None,
    )


def settled_failures(state: ThrottleState, policy: ThrottlePolicy, *, now: float) -> int:
    """A failed attempt's key's failures known to be failures when it is settled (its
    `state` read under the key's lock): the key's count less the OTHER attempts still
    being checked, which were counted when reserved but may yet succeed (a pending count
    older than PENDING_EXPIRY is ignored, failures older than the window are forgotten,
    as in `decide_reservation`). At least 1: this attempt's own failure."""
    fresh = state.pending_at is not None and state.pending_at >= to_datetime(now - PENDING_EXPIRY)
    others_pending = max((state.pending if fresh else 0) - 1, 0)
    failures = state.failures
    if state.last_failure_at < to_datetime(now - policy.window):
        failures = 0
    return max(failures - others_pending, 1)


def decide_failure_waits(
    states: list[ThrottleState], policies: Mapping[str, ThrottlePolicy], *, now: float
) -> dict[str, datetime | None]:
    """The throttle's rule for a failed attempt (its keys' `states` read under their lock
    at settlement): each key waits `delay_after` its settled failures (None: no wait).
    Parallel guesses stay bounded: the reservation's busy rule counts no attempt while
    pending ones may use up the allowance, and the last of a burst to settle sees them
    all settled and sets the wait."""
    until: dict[str, datetime | None] = {}
    for state in states:
        policy = policies[state.key]
        delay = policy.delay_after(settled_failures(state, policy, now=now))
        until[state.key] = to_datetime(now + delay) if delay > 0 else None
    return until


class LoginThrottle:
    """Applies the policies to logins, with the state in the store."""

    def __init__(
        self,
        *,
        store: ThrottleStorage,
        clock: Clock,
        user_policy: ThrottlePolicy,
        peer_policy: ThrottlePolicy,
    ) -> None:
        self._store = store
        self._clock = clock
        self._policies = {"user": user_policy, "peer": peer_policy}

    @classmethod
    def from_settings(
        cls, settings: Settings, *, store: ThrottleStorage, clock: Clock
    ) -> LoginThrottle:
        def policy(free: int) -> ThrottlePolicy:
            return ThrottlePolicy(
                free_failures=free,
                max_delay=float(settings.throttle_max_delay),
                window=float(settings.throttle_window),
            )

        return cls(
            store=store,
            clock=clock,
            user_policy=policy(settings.throttle_user_failures),
            peer_policy=policy(settings.throttle_peer_failures),
        )

    @staticmethod
    def keys(username: str, peer: str | None) -> list[str]:
        """The keys a login attempt counts against: its username first, then its address."""
        return [user_key(username)] + ([peer_key(peer)] if peer else [])

    def _policy(self, key: str) -> ThrottlePolicy:
        return self._policies[key.partition(":")[0]]

    async def reserve(
        self, keys: list[str], *, username_key: str | None = None
    ) -> tuple[Reservation | None, UserRecord | None]:
        """Count an attempt as failed against every key before its password is checked,
        and read (in the same step of the store) the live user of `username_key` for a
        counted attempt (None otherwise, or if there is none).

        Raises LoginThrottled (with the wait) while any key must wait; no reservation,
        counting nothing, while a key has as many attempts being checked as it may still
        fail. The store applies `decide_reservation` under the keys' rows lock, in one step;
        the answer is this rule's, on the rows as the store read them.
        """
        now = self._clock.now()
        at = to_datetime(now)
        pending_since = to_datetime(now - PENDING_EXPIRY)
        policies = {key: self._policy(key) for key in keys}
        states, reserved, user = await self._store.reserve_login_attempt(
            {
                key: (policy.free_failures, to_datetime(now - policy.window))
                for key, policy in policies.items()
            },
            now=at,
            pending_since=pending_since,
            username_key=username_key,
        )
        decision = decide_reservation(states, policies, now=now)
        if reserved != (decision.counts is not None):
            # The store's statement is this rule in SQL (a differential test holds it to
            # it): a disagreement is a bug, never a client's doing.
            raise RuntimeError("the store's throttle reservation differs from the domain's rule")
        if decision.locked_until is not None:
            raise LoginThrottled(retry_after=decision.locked_until.timestamp() - now)
        if decision.counts is None:
            return None, None
        return (
            Reservation(
                reserved_at=at,
                failures={key: failures for key, (failures, _) in decision.counts.items()},
                previous_failure_at={s.key: s.last_failure_at for s in states},
            ),
            user,
        )

    async def failed(self, reservation: Reservation) -> None:
        """The attempt failed: it stays counted, and keys whose settled failures are over
        their allowance wait (`decide_failure_waits`, applied by the store under the keys'
        row locks: the count at reservation included attempts then pending, which a
        gateway's other users may yet settle as successes)."""
        policies = {key: self._policy(key) for key in reservation.failures}

        def decide(states: list[ThrottleState]) -> dict[str, datetime | None]:
            return decide_failure_waits(states, policies, now=self._clock.now())

        await self._store.settle_login_failure(list(policies), decide)

    @staticmethod
    def success(reservation: Reservation) -> ThrottleSettlement:
        """What a right password does to the attempt's keys: the username's count is
        cleared, the address's count takes the attempt back. Applied by the store with the
        login's session (`SessionStorage.create_session`), or alone by `settle_success`."""
        return ThrottleSettlement(
            previous_failure_at=dict(reservation.previous_failure_at),
            clear=frozenset(key for key in reservation.failures if key.startswith("user:")),
            reserved_at=reservation.reserved_at,
        )

    async def settle_success(self, settlement: ThrottleSettlement) -> None:
        """Apply a success's settlement on its own (a right password that starts no session)."""
        await self._store.settle_login_success(settlement)
