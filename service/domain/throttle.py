"""Brute-force throttling of failed logins, per username and per peer address.

After `free_failures` failed logins within `window`, each further failure makes
the key wait `base_delay * 2**(n - free_failures - 1)` seconds, capped at
`max_delay`; a login attempt while a key waits is refused before any password
is checked. Within a process, attempts for one username take turns (check,
verify, count), so a burst of concurrent guesses cannot all pass the check
before the first failure is counted; across processes at most one guess per
process is in flight for a username. A key's count starts over once `window`
passes without a failure, so throttling always ends by itself (no permanent
lock-out), and a successful login clears the username's count. The state lives
in PostgreSQL, so it holds across replicas.

Known limits: anyone who knows a username can make its owner wait (at most
`max_delay` at a time), as with any per-account throttle; and behind a proxy
every client shares the proxy's address key, so raise
AUTH_THROTTLE_PEER_FAILURES there.

With the defaults (5 free failures per username, delays from 1 s doubling to
15 min, a 1 h window), an account takes at most about 17 failures an hour,
well under ASVS's 100. Unknown usernames are throttled exactly like known
ones, so throttling reveals nothing about which usernames exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.clock import Clock, to_datetime
from service.errors import LoginThrottled

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store.postgres import PostgresStore


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
    """The peer's address without its port ("ipv4:127.0.0.1:5000" -> "peer:ipv4:127.0.0.1")."""
    address, _, port = peer.rpartition(":")
    return "peer:" + (address if address and port.isdigit() else peer)


class LoginThrottle:
    """Applies the policies to logins, with the state in the store."""

    def __init__(
        self,
        *,
        store: PostgresStore,
        clock: Clock,
        user_policy: ThrottlePolicy,
        peer_policy: ThrottlePolicy,
    ) -> None:
        self._store = store
        self._clock = clock
        self._policies = {"user": user_policy, "peer": peer_policy}
        self._turns: dict[str, _Turn] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, *, store: PostgresStore, clock: Clock
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

    async def check(self, keys: list[str]) -> None:
        """Refuse (LoginThrottled, with the wait) while any key must wait."""
        now = self._clock.now()
        until = await self._store.login_locked_until(keys, now=to_datetime(now))
        if until is not None:
            raise LoginThrottled(retry_after=until.timestamp() - now)

    async def failed(self, keys: list[str]) -> None:
        """Count a failure against every key and make those over their allowance wait."""
        now = self._clock.now()
        window = max(p.window for p in self._policies.values())
        counts = await self._store.record_login_failure(
            keys, now=to_datetime(now), window_start=to_datetime(now - window)
        )
        waits = {
            key: to_datetime(now + delay)
            for key, failures in counts.items()
            if (delay := self._policies[key.partition(":")[0]].delay_after(failures)) > 0
        }
        if waits:
            await self._store.lock_logins(waits)

    async def succeeded(self, username: str) -> None:
        await self._store.clear_login_failures(user_key(username))

    @asynccontextmanager
    async def turn(self, username: str) -> AsyncIterator[None]:
        """Hold the username's turn in this process for one attempt."""
        turn = self._turns.get(username)
        if turn is None:
            turn = self._turns[username] = _Turn()
        turn.holders += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.holders -= 1
            # Forget it once nobody holds or waits: the map holds only usernames in play.
            if turn.holders == 0:
                del self._turns[username]


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holders: int = 0
