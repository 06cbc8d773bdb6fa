"""A login's authentication: the throttle, the password check, and what they record.

A check, once started, runs to its end in a task of its own whatever happens to its
caller (a deadline, a cancelled call), so every password checked is counted and
recorded. Slots bound those tasks; waiting for one costs and counts nothing.
"""

from __future__ import annotations

import asyncio
import logging

from service.clock import Clock, to_datetime
from service.domain.events import LogRateLimiter, aggregate_key, capped, peer_address
from service.domain.passwords import PasswordHashing
from service.domain.ports import SecurityEventStorage, UserStorage
from service.domain.records import CallerInfo, SecurityEvent, UserRecord
from service.domain.telemetry import NoTelemetry, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.usernames import username_key
from service.errors import AuthError, InvalidCredentials, LoginThrottled

log = logging.getLogger(__name__)

CHECKS_PER_HASHING_THREAD = 4
"""Password checks a process runs at once, per hashing thread: enough to keep the
threads busy, few enough that checks whose callers left cannot pile up."""
BUSY_WAIT_FIRST = 0.01
BUSY_WAIT_MAX = 0.2
"""How long a login whose throttle keys are busy first waits, doubling up to this."""


def _log_unexpected_failure(check: asyncio.Task[object]) -> None:
    """A check whose caller left has nobody to report an unexpected error: log it."""
    error = None if check.cancelled() else check.exception()
    if error is not None and not isinstance(error, AuthError):
        log.error("a password check whose caller left failed", exc_info=error)


class PasswordLogins:
    """Authenticates logins by username and password; one per server process."""

    def __init__(
        self,
        *,
        users: UserStorage,
        events: SecurityEventStorage,
        hasher: PasswordHashing,
        clock: Clock,
        throttle: LoginThrottle | None = None,
        telemetry: Telemetry | None = None,
        log_window: float = 300.0,
    ) -> None:
        self._users = users
        self._events = events
        self._hasher = hasher
        self._clock = clock
        self._throttle = throttle
        self._telemetry = telemetry or NoTelemetry()
        self._check_slots = asyncio.Semaphore(CHECKS_PER_HASHING_THREAD * hasher.threads)
        self._checks: set[asyncio.Task[UserRecord | None]] = set()
        # What a client can repeat at will is logged once per source and window.
        self._limited_log = LogRateLimiter(log, window=log_window, now=clock.now)

    async def authenticate(self, username: str, password: str, caller: CallerInfo) -> UserRecord:
        """The user, once their password is checked: InvalidCredentials (recorded) if it is
        wrong or the user is disabled, LoginThrottled (recorded) while a key must wait."""
        # Looked up, and throttled, by the canonical key: `Alice` is `alice`'s account, and
        # varying the case must not give a guesser fresh allowances.
        throttle_keys = LoginThrottle.keys(username_key(username), caller.peer)
        try:
            return await self._checked_user(username, password, throttle_keys, caller)
        except LoginThrottled:
            # Refused before any hashing: the cheapest call there is. One row and one log
            # line per address and window (an attacker picks the usernames).
            address = peer_address(caller.peer)
            await self._events.record_event(
                SecurityEvent(
                    kind="login_throttled",
                    peer=caller.peer,
                    detail={"username": capped(username)},
                    aggregate_key=aggregate_key(address),
                ),
                now=to_datetime(self._clock.now()),
            )
            self._limited_log.warning(
                ("login_throttled", address), "security: login throttled (peer %s)", address
            )
            self._telemetry.login("throttled")
            raise

    async def upgrade_hash(self, user: UserRecord, password: str) -> None:
        """After a successful login: a hash made with older parameters is replaced (unless
        the password changed meanwhile)."""
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._hasher.hash(password)
            await self._users.set_password_hash(
                user.id,
                new_hash,
                now=to_datetime(self._clock.now()),
                replacing=user.password_hash,
            )

    async def finish_password_checks(self) -> None:
        """Wait for the checks still running (at shutdown, before the pool closes)."""
        await asyncio.gather(*self._checks, return_exceptions=True)

    async def _checked_user(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> UserRecord:
        busy_wait = BUSY_WAIT_FIRST
        while True:
            await self._check_slots.acquire()
            check = asyncio.create_task(
                self._check_password(username, password, throttle_keys, caller)
            )
            self._checks.add(check)
            check.add_done_callback(self._check_ended)
            try:
                user = await asyncio.shield(check)
            except asyncio.CancelledError:
                check.add_done_callback(_log_unexpected_failure)
                raise
            if user is not None:
                return user
            await asyncio.sleep(busy_wait)
            busy_wait = min(2 * busy_wait, BUSY_WAIT_MAX)

    async def _check_password(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> UserRecord | None:
        """Count the attempt, check the password, settle the count: the user, or None
        (nothing counted or checked) while the throttle keys are busy. Holds a slot."""
        throttle = self._throttle
        try:
            reservation = None
            if throttle is not None:
                reservation = await throttle.reserve(throttle_keys)
                if reservation is None:
                    return None
            user = await self._users.find_user(username_key(username))
            # Unknown users are verified against a dummy hash: the same work, the same answer.
            matches = await self._hasher.verify(
                None if user is None else user.password_hash, password
            )
            now = self._clock.now()
            if user is None or not matches or user.disabled:
                if throttle is not None and reservation is not None:
                    await throttle.failed(reservation)
                await self._events.record_event(
                    SecurityEvent(
                        kind="login_failed",
                        subject=None if user is None else str(user.id),
                        peer=caller.peer,
                        detail={"username": capped(username)},
                        aggregate_key=aggregate_key(
                            peer_address(caller.peer), username_key(username)
                        ),
                    ),
                    now=to_datetime(now),
                )
                self._telemetry.login("failed")
                raise InvalidCredentials()
            if throttle is not None and reservation is not None:
                await throttle.succeeded(reservation)
            return user
        finally:
            self._check_slots.release()

    def _check_ended(self, check: asyncio.Task[UserRecord | None]) -> None:
        self._checks.discard(check)
        if not check.cancelled():
            check.exception()  # seen by the caller if it still waits; else expected
