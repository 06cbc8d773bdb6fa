"""Keeps a process's `RevocationState` equal to the database's, without Validate asking it.

Every revocation travels with its session's `access_expires_max` (the latest `exp` of any
access token the session was issued), which says how long to remember it. A revocation of
every session of a user travels as one entry (the user's new generation and bound), on
its own channel, through the same load, notifications and polls.

- At start: a full read of the revoked sessions whose tokens may still be alive.
- Then: PostgreSQL LISTEN on a dedicated connection (not a pooled one, so a busy
  pool never delays it). Every revoking transaction sends a NOTIFY on commit.
- When that connection drops: reconnect with backoff, LISTEN again, and read the
  window in full, so nothing revoked meanwhile is missed.
- A periodic poll through the pool is a safety net for anything in between.

The same connection hears when signing keys change (`KEYS_CHANNEL`); the feed then calls
`on_keys_changed` (which reloads the key ring), and also after every reconnect and poll,
so a missed key notification is made up the same way as a missed revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from service.clock import Clock, to_datetime
from service.domain.revocation import (
    Revocation,
    RevocationState,
    UserRevocation,
    forgettable_before,
)
from service.store.base import UNAVAILABLE_ERRORS
from service.store.notifications import (
    CHANNEL,
    KEYS_CHANNEL,
    USERS_CHANNEL,
    parse_payload,
    parse_user_payload,
)

log = logging.getLogger(__name__)

LISTENER_APPLICATION_NAME = "authsvc-revocation-listener"
# Revocations committed late (long transactions) still show up in the poll.
_POLL_OVERLAP_SECONDS = 60.0

# Every revocation still to be remembered, whenever it was made.
_REMEMBERED_SQL = """
SELECT id::text AS id, extract(epoch FROM revoked_at)::float8 AS revoked_at,
       extract(epoch FROM access_expires_max)::float8 AS access_expires_max
  FROM sessions WHERE revoked_at IS NOT NULL AND access_expires_max >= $1
"""
# The safety-net poll: revocations made lately (a missed notification).
_RECENT_SQL = """
SELECT id::text AS id, extract(epoch FROM revoked_at)::float8 AS revoked_at,
       extract(epoch FROM access_expires_max)::float8 AS access_expires_max
  FROM sessions WHERE revoked_at >= $1
"""


# The same for users' revocations (the latest of each user; it covers the earlier ones).
_USERS_COLUMNS = """
SELECT id::text AS id, session_generation,
       extract(epoch FROM sessions_revoked_at)::float8 AS revoked_at,
       extract(epoch FROM revoked_sessions_until)::float8 AS access_expires_max
  FROM users"""
_REMEMBERED_USERS_SQL = _USERS_COLUMNS + " WHERE revoked_sessions_until >= $1"
_RECENT_USERS_SQL = _USERS_COLUMNS + " WHERE sessions_revoked_at >= $1"


def _revocations(rows: list[asyncpg.Record]) -> list[Revocation]:
    return [Revocation(r["id"], r["revoked_at"], r["access_expires_max"]) for r in rows]


def _user_revocations(rows: list[asyncpg.Record]) -> list[UserRevocation]:
    return [
        UserRevocation(r["id"], r["session_generation"], r["revoked_at"], r["access_expires_max"])
        for r in rows
    ]


class RevocationFeed:
    """Runs the listener and the poll for one process."""

    def __init__(
        self,
        *,
        dsn: str,
        pool: asyncpg.Pool,
        state: RevocationState,
        clock: Clock,
        poll_interval: float,
        timeout: float,
        on_listening: Callable[[bool], Awaitable[None]] | None = None,
        on_keys_changed: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._state = state
        self._clock = clock
        self._poll_interval = poll_interval
        self._timeout = timeout
        self._on_listening = on_listening
        self._on_keys_changed = on_keys_changed
        self._key_reloads: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up (tests wait on it)."""
        self.reconnects = 0
        self.polls = 0
        """Polls completed (tests wait on it)."""

    async def start(self) -> None:
        """Load the window (failing start-up if the database is down), then follow it."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await self._load_window(conn)
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="revocation-listener"),
            asyncio.create_task(self._poll_forever(), name="revocation-poll"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in [*self._tasks, *self._key_reloads]:
            task.cancel()
        for task in [*self._tasks, *self._key_reloads]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _load_window(self, conn: asyncpg.Connection) -> None:
        now = self._clock.now()
        cutoff = to_datetime(forgettable_before(now))
        rows = await conn.fetch(_REMEMBERED_SQL, cutoff)
        users = await conn.fetch(_REMEMBERED_USERS_SQL, cutoff)
        # Added, never replaced: revocations are never undone, and one made by this
        # process after the read's snapshot must not vanish until its NOTIFY arrives.
        self._state.add(_revocations(rows))
        self._state.add_users(_user_revocations(users))
        self._state.prune(now)
        self._state.synced_at = now

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str):
            revocations = parse_payload(payload)
            self._state.add(revocations)
            if revocations:
                # How long the news took to reach us, for the metrics.
                latest = max(r.revoked_at for r in revocations)
                self._state.lag = max(0.0, self._clock.now() - latest)

    def _on_users_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str):
            revocations = parse_user_payload(payload)
            self._state.add_users(revocations)
            if revocations:
                self._state.lag = max(0.0, self._clock.now() - revocations[0].revoked_at)

    def _on_keys_notify(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_keys())
        self._key_reloads.add(task)  # a reference, so the task is not collected mid-way
        task.add_done_callback(self._key_reloads.discard)

    async def _reload_keys(self) -> None:
        if self._on_keys_changed is None:
            return
        try:
            await self._on_keys_changed()
        except Exception as exc:  # the next notification, reconnect or poll tries again
            log.warning("signing keys reload failed (%s)", type(exc).__name__)

    async def _listen_forever(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._timeout,
                    server_settings={"application_name": LISTENER_APPLICATION_NAME},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, event=lost: event.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(USERS_CHANNEL, self._on_users_notify)
                await conn.add_listener(KEYS_CHANNEL, self._on_keys_notify)
                # Listening first, then reading: a revocation lands in one or both.
                await self._load_window(conn)
                await self._reload_keys()
                self.listening.set()
                await self._tell_listening(True)
                delay = 0.1
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=1.0)
                log.warning("revocation listener connection lost; reconnecting")
            except Exception as exc:  # any failure: retry; never let the listener die
                log.warning("revocation listener cannot connect (%s); retrying", type(exc).__name__)
            finally:
                if self.listening.is_set():
                    self.listening.clear()
                    await self._tell_listening(False)
                self._state.synced_at = None
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(*UNAVAILABLE_ERRORS):
                        await conn.close(timeout=1.0)
            self.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, 2.0)

    async def _tell_listening(self, listening: bool) -> None:
        if self._on_listening is not None:
            with contextlib.suppress(Exception):
                await self._on_listening(listening)

    async def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._poll_interval)
            if self._stopping.is_set():
                return
            now = self._clock.now()
            try:
                since = to_datetime(now - self._poll_interval - _POLL_OVERLAP_SECONDS)
                async with self._pool.acquire(timeout=self._timeout) as conn:
                    rows = await conn.fetch(_RECENT_SQL, since)
                    users = await conn.fetch(_RECENT_USERS_SQL, since)
            except Exception as exc:  # any failure: try again next round
                log.warning("revocation poll failed (%s)", type(exc).__name__)
                continue
            self._state.add(_revocations(rows))
            self._state.add_users(_user_revocations(users))
            self._state.prune(now)
            self.polls += 1
            await self._reload_keys()
