"""Keeps a process's `RevocationState` equal to the database's revocation log, without
Validate asking it.

The log (migration 0011) holds every revocation (one row per session, one per user-wide
revocation) and every signing-key change, each with a sequence that grows in commit order,
and a NOTIFY on `LOG_CHANNEL` that only says "the log advanced to N".

- At start: a full read (every unexpired row, the head's sequence and the compaction
  horizon, in one snapshot).
- Then: PostgreSQL LISTEN on a dedicated connection (not a pooled one, so a busy pool
  never delays it). A notification past our position wakes the follower, which reads
  `sequence > ours` in order, through the pool, in batches.
- When that connection drops: reconnect with backoff, LISTEN again, then catch up the
  same way (the rows missed meanwhile are in the log).
- A periodic poll through the pool is a safety net for anything in between; while the
  LISTEN connection is down (reconnecting, its backoff growing), the log is read through
  the pool every `LISTENER_DOWN_POLL_INTERVAL`, so a revocation still arrives within about
  that long (issue 10: within 1 s while the listener is being cut).
- Only with a cursor below the compaction horizon (the janitor deleted rows past it)
  is the log read in full again.

A `keys` row makes the follower reload the key ring (`on_keys_changed`) before the rows
are applied, so a watcher told of the change gets the new JWK Set; the keys are also
reloaded after every reconnect and poll (a cheap comparison when nothing changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from service.clock import Clock, to_datetime
from service.domain.revocation import (
    REMEMBER_PAST_BOUND_SECONDS,
    KeysChanged,
    LogEntry,
    LogRecord,
    Revocation,
    RevocationState,
    UserRevocation,
)
from service.store.base import UNAVAILABLE_ERRORS
from service.store.notifications import LOG_CHANNEL, parse_log_position

log = logging.getLogger(__name__)

LISTENER_APPLICATION_NAME = "authsvc-revocation-listener"
CATCH_UP_BATCH = 10_000
LISTENER_DOWN_POLL_INTERVAL = 0.2
"""Seconds between reads of the log through the pool while no notification can come."""
"""Log rows per read when catching up."""

_COLUMNS = """sequence, kind, session_id::text AS session_id, user_id::text AS user_id,
       generation, extract(epoch FROM revoked_at)::float8 AS revoked_at,
       extract(epoch FROM keep_until)::float8 AS keep_until"""
_HEAD_SQL = """SELECT (SELECT sequence FROM revocation_log_head) AS head,
       (SELECT compacted_through FROM revocation_log_horizon) AS horizon"""
# Every row still to be remembered ($1: now), in log order.
_FULL_SQL = f"""SELECT {_COLUMNS} FROM revocation_log
 WHERE keep_until >= $1 AND sequence IS NOT NULL ORDER BY sequence"""  # noqa: S608
# The horizon and the rows after $1 (at most $2), in one snapshot: a reader whose cursor is
# below that horizon may have lost rows to the janitor, and reads in full instead.
_AFTER_SQL = f"""SELECT h.compacted_through AS horizon, l.*
  FROM revocation_log_horizon h
  LEFT JOIN LATERAL (SELECT {_COLUMNS} FROM revocation_log
                      WHERE sequence > $1 ORDER BY sequence LIMIT $2) l ON true
 ORDER BY l.sequence"""  # noqa: S608


def log_record(row: asyncpg.Record) -> LogRecord:
    """What one row of the log says (the bound is recovered from `keep_until`)."""
    bound = row["keep_until"] - REMEMBER_PAST_BOUND_SECONDS
    if row["kind"] == "session":
        return Revocation(row["session_id"], row["revoked_at"], bound)
    if row["kind"] == "user":
        return UserRevocation(row["user_id"], row["generation"], row["revoked_at"], bound)
    return KeysChanged(row["revoked_at"], row["keep_until"])


def log_entries(rows: list[asyncpg.Record]) -> list[LogEntry]:
    return [LogEntry(r["sequence"], log_record(r)) for r in rows if r["sequence"] is not None]


async def read_full_log(conn: asyncpg.Connection, now: float) -> tuple[list[LogEntry], int, int]:
    """Every unexpired row, the head's sequence and the compaction horizon, all of one
    snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(_HEAD_SQL)
        rows = await conn.fetch(_FULL_SQL, to_datetime(now))
    assert head is not None
    return log_entries(rows), head["head"], head["horizon"]


async def read_log_after(
    conn: asyncpg.Connection, sequence: int, limit: int
) -> tuple[list[LogEntry], int]:
    """At most `limit` rows after `sequence`, in order, and the compaction horizon."""
    rows = await conn.fetch(_AFTER_SQL, sequence, limit)
    return log_entries(rows), rows[0]["horizon"]


class RevocationFeed:
    """Runs the listener, the follower and the poll for one process."""

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
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Condition()
        # One read at a time: entries are applied in log order, and a full read never
        # races an incremental one.
        self._reading = asyncio.Lock()
        self.notified = 0
        """The highest sequence a notification announced."""
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up (tests wait on it)."""
        self.reconnects = 0
        self.polls = 0
        """Polls completed (tests wait on it)."""
        self.full_reads = 0
        """Full reads of the log (the start's included)."""
        self.catch_ups = 0
        """Reads of the log after our position begun (tests count them)."""

    async def start(self) -> None:
        """Read the log in full (failing start-up if the database is down), then follow it."""
        async with self._reading, self._pool.acquire(timeout=self._timeout) as conn:
            await self._read_in_full(conn)
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="revocation-listener"),
            asyncio.create_task(self._follow_forever(), name="revocation-follower"),
            asyncio.create_task(self._poll_forever(), name="revocation-poll"),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        """Read the log after our position soon (a watcher asked for a later one)."""
        self._wake.set()

    async def wait_for(self, sequence: int, within: float) -> bool:
        """Whether the state reaches `sequence` within `within` seconds (waking the
        follower to look)."""
        if self._state.sequence >= sequence:
            return True
        # While notifications are heard, one announcing `sequence` wakes the follower
        # itself; a position none announced is no reason to read the log (a client could
        # otherwise drive a query per reconnect). Without them, look now.
        if not self.listening.is_set() or sequence <= self.notified:
            self.wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within), self._caught_up:
                await self._caught_up.wait_for(lambda: self._state.sequence >= sequence)
        return self._state.sequence >= sequence

    async def _read_in_full(self, conn: asyncpg.Connection) -> None:
        now = self._clock.now()
        entries, head, horizon = await read_full_log(conn, now)
        if any(isinstance(e.record, KeysChanged) for e in entries if e.sequence > head):
            await self._reload_keys()
        self._state.reset(entries, sequence=head, horizon=horizon)
        self._state.prune(now)
        self._state.synced_at = now
        self.full_reads += 1

    async def catch_up(self) -> None:
        """Apply every row after our position, in order (in full if compacted past it)."""
        self.catch_ups += 1
        async with self._reading, self._pool.acquire(timeout=self._timeout) as conn:
            while True:
                entries, horizon = await read_log_after(conn, self._state.sequence, CATCH_UP_BATCH)
                if horizon > self._state.sequence:
                    log.info("revocation log compacted past our position; reading it in full")
                    await self._read_in_full(conn)
                    break
                if any(isinstance(e.record, KeysChanged) for e in entries):
                    await self._reload_keys()
                applied = self._state.apply(entries)
                if applied:
                    # How long the news took to reach us (commit time to applied here).
                    latest = max(_logged_at(e.record) for e in applied)
                    self._state.lag = max(0.0, self._clock.now() - latest)
                if len(entries) < CATCH_UP_BATCH:
                    break
        if self.listening.is_set():
            self._state.synced_at = self._clock.now()
        async with self._caught_up:
            self._caught_up.notify_all()

    async def _follow_forever(self) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.catch_up()
            except Exception as exc:  # the next notification, reconnect or poll tries again
                log.warning("revocation log read failed (%s)", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=0.2)
                self._wake.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        sequence = parse_log_position(payload)
        if sequence is None:
            log.warning("ignored a malformed revocation log notification")
            return
        self.notified = max(self.notified, sequence)
        if sequence > self._state.sequence:
            self._wake.set()

    async def _reload_keys(self) -> None:
        if self._on_keys_changed is None:
            return
        try:
            await self._on_keys_changed()
        except Exception as exc:  # the next key row, reconnect or poll tries again
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
                await conn.add_listener(LOG_CHANNEL, self._on_notify)
                # Listening first, then reading: a row lands in one or both.
                await self.catch_up()
                await self._reload_keys()
                self.listening.set()
                self._state.synced_at = self._clock.now()
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
        loop = asyncio.get_running_loop()
        tick = min(self._poll_interval, LISTENER_DOWN_POLL_INTERVAL)
        polled_at = loop.time()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=tick)
            if self._stopping.is_set():
                return
            # (A timer may fire a hair early: a tick equal to the interval must still poll.)
            if loop.time() - polled_at < self._poll_interval - 0.001:
                if not self.listening.is_set():
                    # No notification can wake the follower: read what it would have.
                    with contextlib.suppress(Exception):  # the listener logs the outage
                        await self.catch_up()
                continue
            polled_at = loop.time()
            try:
                await self.catch_up()
            except Exception as exc:  # any failure: try again next round
                log.warning("revocation poll failed (%s)", type(exc).__name__)
                continue
            self._state.prune(self._clock.now())
            self.polls += 1
            await self._reload_keys()


def _logged_at(record: LogRecord) -> float:
    return record.changed_at if isinstance(record, KeysChanged) else record.revoked_at
