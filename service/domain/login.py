"""A login's authentication: the throttle, the password check, and what they record.

A check, once started, runs to its end in a task of its own whatever happens to its
caller (a deadline, a cancelled call), so every password checked is counted and
recorded. Slots bound those tasks; waiting for one costs and counts nothing.

A right password's throttle settlement is not applied by the check: it is returned with
the user (`Authenticated`), and the login applies it with its session, in one statement
(`SessionStorage.create_session`); a right password that starts no session (its caller
left, a scope refused) is settled on its own (`settle`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from service.clock import Clock, to_datetime
from service.domain.events import LogRateLimiter, aggregate_key, capped, peer_address
from service.domain.passwords import PasswordHashing
from service.domain.ports import SecurityEventStorage, UserStorage
from service.domain.records import CallerInfo, SecurityEvent, ThrottleSettlement, UserRecord
from service.domain.telemetry import NoTelemetry, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.usernames import username_key
from service.errors import AuthError, InvalidCredentials, LoginThrottled

log = logging.getLogger(__name__)

T = TypeVar("T")

CHECKS_PER_HASHING_THREAD = 4
"""Password checks a process runs at once, per hashing thread: enough to keep the
threads busy, few enough that checks whose callers left cannot pile up."""
BUSY_WAIT_FIRST = 0.01
BUSY_WAIT_MAX = 0.2
"""How long a login whose throttle keys are busy first waits, doubling up to this."""


def _log_unexpected_failure(task: asyncio.Task[Any]) -> None:
    """A check (or a login's last write) whose caller left has nobody to report an
    unexpected error: log it."""
    error = None if task.cancelled() else task.exception()
    if error is not None and not isinstance(error, AuthError):
        log.error("a login's work whose caller left failed", exc_info=error)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A user whose password was checked, and what the login must do to the throttle."""

    user: UserRecord
    settlement: ThrottleSettlement | None
    """The reservation's settlement as a success; None with the throttle off."""


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
        self._checks: set[asyncio.Task[Any]] = set()
        # What a client can repeat at will is logged once per source and window.
        self._limited_log = LogRateLimiter(log, window=log_window, now=clock.now)

    async def authenticate(self, username: str, password: str, caller: CallerInfo) -> Authenticated:
        """The user, once their password is checked, with the throttle's settlement that the
        login must apply (`start_session`, or `settle`): InvalidCredentials (recorded) if it
        is wrong or the user is disabled, LoginThrottled (recorded) while a key must wait."""
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

    async def start_session(self, authenticated: Authenticated, write: Coroutine[Any, Any, T]) -> T:
        """Await the login's last `write`, which carries `authenticated.settlement`: once
        started, it runs to its end even if the caller leaves (else a right password could
        stay counted as a failure); with nothing to settle, in the caller's task."""
        if authenticated.settlement is None:
            return await write
        return await self._run_to_end(write)

    async def settle(self, authenticated: Authenticated) -> None:
        """A right password that starts no session: its throttle settlement, on its own
        (run to its end, as `start_session`)."""
        if self._throttle is not None and authenticated.settlement is not None:
            await self._run_to_end(self._throttle.settle_success(authenticated.settlement))

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
        """Wait for the checks still running (at shutdown, before the pool closes), and
        for the settlements of those whose callers left."""
        while self._checks:
            await asyncio.gather(*self._checks, return_exceptions=True)

    async def _checked_user(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> Authenticated:
        busy_wait = BUSY_WAIT_FIRST
        while True:
            await self._check_slots.acquire()
            authenticated = await self._run_to_end(
                self._check_password(username, password, throttle_keys, caller),
                if_caller_left=self._settle_when_caller_left,
            )
            if authenticated is not None:
                return authenticated
            await asyncio.sleep(busy_wait)
            busy_wait = min(2 * busy_wait, BUSY_WAIT_MAX)

    async def _check_password(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> Authenticated | None:
        """Count the attempt and read the user (one step of the store), check the password,
        settle a failure: the user and the success's settlement, or None (nothing counted
        or checked) while the throttle keys are busy. Holds a slot."""
        throttle = self._throttle
        key = username_key(username)
        try:
            reservation = None
            if throttle is None:
                user = await self._users.find_user(key)
            else:
                reservation, user = await throttle.reserve(throttle_keys, username_key=key)
                if reservation is None:
                    return None
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
                        aggregate_key=aggregate_key(peer_address(caller.peer), key),
                    ),
                    now=to_datetime(now),
                )
                self._telemetry.login("failed")
                raise InvalidCredentials()
            return Authenticated(
                user, None if reservation is None else LoginThrottle.success(reservation)
            )
        finally:
            self._check_slots.release()

    def _check_ended(self, check: asyncio.Task[Any]) -> None:
        self._checks.discard(check)
        if not check.cancelled():
            check.exception()  # seen by the caller if it still waits; else expected

    def _keep(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Hold `task` until it ends (`finish_password_checks` waits for it)."""
        self._checks.add(task)
        task.add_done_callback(self._check_ended)
        return task

    async def _run_to_end(
        self,
        work: Coroutine[Any, Any, T],
        *,
        if_caller_left: Callable[[asyncio.Task[T]], None] | None = None,
    ) -> T:
        """Await `work` in a task of its own that a cancelled caller does not stop (waited
        for at shutdown; an error nobody awaits any more is logged, and `if_caller_left`
        is called with the task once it ends)."""
        task = self._keep(asyncio.create_task(work))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_unexpected_failure)
            if if_caller_left is not None:
                task.add_done_callback(if_caller_left)
            raise

    def _settle_when_caller_left(self, check: asyncio.Task[Authenticated | None]) -> None:
        """A right password whose caller left before it could start the session: settled
        on its own, so that it does not stay counted as a failure."""
        if check.cancelled() or check.exception() is not None:
            return
        authenticated = check.result()
        if self._throttle is None or authenticated is None or authenticated.settlement is None:
            return
        settling = asyncio.ensure_future(self._throttle.settle_success(authenticated.settlement))
        self._keep(settling).add_done_callback(_log_unexpected_failure)
