"""WatchRevocations: the revocation log, as this process applies it, pushed to verifiers.

`RevocationWatchHub` hears every batch of log entries the process's `RevocationState`
applies (the feed follows the database's log) and turns it, once, into serialized
`RevocationUpdate` bodies shared by every open stream. Each stream (`Watcher`) has a queue
of those bodies, bounded in bytes (`AUTH_WATCH_QUEUE_BYTES`), drained by its own writer
(`write_updates`), which merges whatever is waiting into one update (at most
`MAX_UPDATE_ENTRIES` entries) and sends a heartbeat when nothing else went out for
`AUTH_WATCH_HEARTBEAT`. A watcher whose queue overflows (its client does not read: gRPC's
write waits on flow control) is cut off (`WatcherTooSlow`), never buffered without bound.

The first updates come from memory too: a snapshot (built once per state version and
shared, `SnapshotCache`) or, for a watcher resuming from a sequence this process still
holds, exactly the entries after it. A snapshot too large for one update is split: the
first part has `snapshot` set, every part but the last has sequence 0, and the last
carries the snapshot's sequence (a client applies the snapshot once that part is in).
Guarantees and semantics: docs/api.md, "WatchRevocations".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from authsvc_client.gen.auth.v1 import auth_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from service.domain.revocation import (
    KeysChanged,
    LogEntry,
    Revocation,
    RevocationState,
    UserRevocation,
    remembered_until,
)
from service.errors import ShuttingDown

log = logging.getLogger(__name__)

MAX_UPDATE_ENTRIES = 10_000
"""Revoked sessions and users in one update at most (about 60 bytes each: well under
1 MiB, inside a client's default 4 MiB receive limit)."""
SNAPSHOT_REUSE_SECONDS = 1.0
"""A cached snapshot is served (with the entries after it) for this long before a newer
one is built: 1,000 watchers connecting at once cost one build."""


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1_000_000_000))
    return ts


@dataclass(frozen=True, slots=True)
class Body:
    """Serialized entries of one update (`revoked`, `revoked_users`), shared by watchers."""

    data: bytes
    entries: int
    sequence: int
    """The log position its last entry brings a client to (0: part of a snapshot)."""
    keys_changed: bool = False


def _bodies(
    sessions: list[tuple[str, float]],
    users: list[tuple[str, int, float]],
    *,
    sequence: int = 0,
) -> list[Body]:
    """Chunks of at most MAX_UPDATE_ENTRIES entries, each serialized once."""
    bodies: list[Body] = []
    items: list[tuple[str, float] | tuple[str, int, float]] = [*sessions, *users]
    for start in range(0, len(items), MAX_UPDATE_ENTRIES):
        chunk = items[start : start + MAX_UPDATE_ENTRIES]
        update = auth_pb2.RevocationUpdate(
            revoked=[
                auth_pb2.RevokedSession(session_id=item[0], keep_until=_timestamp(item[1]))
                for item in chunk
                if len(item) == 2
            ],
            revoked_users=[
                auth_pb2.RevokedUser(
                    subject=item[0], generation=item[1], keep_until=_timestamp(item[2])
                )
                for item in chunk
                if len(item) == 3
            ],
        )
        bodies.append(Body(update.SerializeToString(), len(chunk), sequence))
    return bodies


def entry_bodies(entries: list[LogEntry]) -> list[Body]:
    """Log entries (in order) as update bodies of at most MAX_UPDATE_ENTRIES each, every
    one carrying the sequence of its last entry and whether a key changed in it."""
    bodies: list[Body] = []
    for start in range(0, len(entries), MAX_UPDATE_ENTRIES):
        chunk = entries[start : start + MAX_UPDATE_ENTRIES]
        sessions = [
            (e.record.session_id, remembered_until(e.record.access_expires_max))
            for e in chunk
            if isinstance(e.record, Revocation)
        ]
        users = [
            (e.record.user_id, e.record.generation, remembered_until(e.record.access_expires_max))
            for e in chunk
            if isinstance(e.record, UserRevocation)
        ]
        data = b"".join(b.data for b in _bodies(sessions, users))
        bodies.append(
            Body(
                data,
                len(sessions) + len(users),
                chunk[-1].sequence,
                keys_changed=any(isinstance(e.record, KeysChanged) for e in chunk),
            )
        )
    return bodies


def header(*, sequence: int, snapshot: bool = False, jwks_json: str = "", sent_at: float) -> bytes:
    """An update's own fields, serialized; a body appended to it adds its entries (a
    concatenation of serialized messages parses as their merge)."""
    return auth_pb2.RevocationUpdate(
        sequence=sequence, snapshot=snapshot, jwks_json=jwks_json, sent_at=_timestamp(sent_at)
    ).SerializeToString()


@dataclass(frozen=True, slots=True)
class FirstUpdate:
    """One of a stream's first updates: a shared body and the fields of its own, made into
    a message only when it is written."""

    body: Body
    snapshot: bool = False
    jwks_json: str = ""

    def message(self, sent_at: float) -> bytes:
        return (
            header(
                sequence=self.body.sequence,
                snapshot=self.snapshot,
                jwks_json=self.jwks_json,
                sent_at=sent_at,
            )
            + self.body.data
        )


@dataclass(slots=True)
class SnapshotCache:
    """The last snapshot's bodies and the state position and version it was built at."""

    bodies: list[Body]
    sequence: int
    version: int
    forgotten: int
    built_at: float


@dataclass(eq=False)
class Watcher:
    """One open stream: its queue of bodies waiting to be written, bounded in bytes."""

    max_pending_bytes: int
    pending: deque[Body] = field(default_factory=deque)
    pending_bytes: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    cut_off: asyncio.Event = field(default_factory=asyncio.Event)
    rewound: bool = False
    """The database's log went back (a restore): this stream must start over."""
    stopping: bool = False
    """This process is stopping: the client goes on with another replica."""

    def push(self, bodies: list[Body]) -> bool:
        """Queue bodies; False (and cut off) if that would pass the bound."""
        if self.cut_off.is_set():
            return False
        size = sum(len(b.data) for b in bodies)
        # An empty queue takes any one batch (at most one catch-up read, ~600 KB): the
        # bound is on what waits behind a write that does not finish.
        if self.pending and self.pending_bytes + size > self.max_pending_bytes:
            self.pending.clear()  # nothing more will be sent: let the bodies go
            self.pending_bytes = 0
            self.cut_off.set()
            return False
        self.pending.extend(bodies)
        self.pending_bytes += size
        self.ready.set()
        return True

    def take(self) -> list[Body]:
        """The bodies waiting, oldest first, as many as fit in one update (at least one)."""
        taken: list[Body] = []
        entries = 0
        while self.pending and (
            not taken or entries + self.pending[0].entries <= MAX_UPDATE_ENTRIES
        ):
            body = self.pending.popleft()
            self.pending_bytes -= len(body.data)
            entries += body.entries
            taken.append(body)
        if not self.pending:
            self.ready.clear()
        return taken


class RevocationWatchHub:
    """The open WatchRevocations streams of this process, fed by its RevocationState."""

    def __init__(
        self,
        *,
        state: RevocationState,
        jwks_json: Callable[[], str],
        max_pending_bytes: int,
        heartbeat: float,
        now: Callable[[], float],
        catch_up: Callable[[int, float], Awaitable[bool]] | None = None,
    ) -> None:
        self._state = state
        self._jwks_json = jwks_json
        self._max_pending_bytes = max_pending_bytes
        self.heartbeat = heartbeat
        self._now = now
        self._catch_up = catch_up
        self._watchers: set[Watcher] = set()
        self._snapshot: SnapshotCache | None = None
        self._stopping = False
        self.updates_sent = 0
        self.cut_off = 0
        self.snapshots_built = 0
        state.subscribe(self._applied)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def _applied(self, entries: list[LogEntry], rewound: bool) -> None:
        if rewound:
            for watcher in self._watchers:
                watcher.rewound = True
                watcher.cut_off.set()
            return
        if not entries or not self._watchers:
            return
        bodies = entry_bodies(entries)  # serialized once, shared by every watcher
        for watcher in self._watchers:
            if not watcher.push(bodies):
                self._cut(watcher)

    def end_streams(self) -> None:
        """This process is stopping: end every open stream and refuse new ones (each with
        ShuttingDown, which verifiers retry on another replica), so that no stream holds
        the stop for its whole grace."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.stopping = True
            watcher.cut_off.set()
        self._watchers.clear()

    def _cut(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.discard(watcher)
            if not watcher.rewound:
                self.cut_off += 1

    async def reach(self, sequence: int, within: float) -> bool:
        """Whether this process reaches log position `sequence` within `within` seconds
        (a client resuming from a position another replica gave it)."""
        if self._state.sequence >= sequence:
            return True
        if self._catch_up is None:
            return False
        return await self._catch_up(sequence, within)

    def open(self, after_sequence: int) -> tuple[Watcher, list[FirstUpdate]]:
        """A new watcher and its first updates: exactly what came after `after_sequence`
        if this process holds all of it (and it is not 0) and it fits in one update, else a
        snapshot. Registered in the same step (no await between): every later batch
        reaches its queue.

        The updates are kept as shared bodies and made into messages one at a time as they
        are written (`write_updates`): a stream that does not read holds one update, never
        a copy of the snapshot. A resume from further behind gets the snapshot (built once,
        shared) rather than a serialization of the journal of its own. Refused
        (ShuttingDown) once `end_streams` ran."""
        if self._stopping:
            raise ShuttingDown()
        watcher = Watcher(self._max_pending_bytes)
        self._watchers.add(watcher)
        jwks = self._jwks_json()
        state = self._state
        missed = (
            state.entries_after(after_sequence, at_most=MAX_UPDATE_ENTRIES)
            if after_sequence
            else None
        )
        if missed is not None:
            bodies = entry_bodies(missed)
            if not bodies:
                return watcher, [FirstUpdate(Body(b"", 0, state.sequence), jwks_json=jwks)]
            return watcher, [
                FirstUpdate(b, jwks_json=jwks if i == 0 else "") for i, b in enumerate(bodies)
            ]
        snapshot = self._current_snapshot()
        # The entries applied since the cached snapshot was built (a moment's worth; when
        # more, a newer snapshot is built).
        since = state.entries_after(snapshot.sequence, at_most=MAX_UPDATE_ENTRIES)
        if since is None:
            snapshot = self._current_snapshot(rebuild=True)
            since = []
        parts = snapshot.bodies or [Body(b"", 0, 0)]
        first = [
            FirstUpdate(
                Body(
                    body.data,
                    body.entries,
                    snapshot.sequence if i == len(parts) - 1 else 0,
                ),
                snapshot=i == 0,
                jwks_json=jwks if i == 0 else "",
            )
            for i, body in enumerate(parts)
        ]
        first.extend(FirstUpdate(b) for b in entry_bodies(since))
        return watcher, first

    def _current_snapshot(self, *, rebuild: bool = False) -> SnapshotCache:
        state = self._state
        cached = self._snapshot
        if (
            not rebuild
            and cached is not None
            and (
                cached.version == state.version
                or (
                    time.monotonic() - cached.built_at < SNAPSHOT_REUSE_SECONDS
                    and cached.forgotten == state.forgotten
                    and state.entries_after(cached.sequence, at_most=MAX_UPDATE_ENTRIES) is not None
                )
            )
        ):
            return cached
        bodies = _bodies(state.revoked_session_entries(), state.revoked_user_entries())
        self._snapshot = SnapshotCache(
            bodies, state.sequence, state.version, state.forgotten, time.monotonic()
        )
        self.snapshots_built += 1
        return self._snapshot

    def close(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    async def write_updates(
        self,
        watcher: Watcher,
        first: list[FirstUpdate],
        write: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Write the first updates, then whatever the watcher's queue gets, merged, and a
        heartbeat whenever nothing went out for `heartbeat` seconds. Runs until cancelled."""
        sent_jwks = self._jwks_json()
        last_write = time.monotonic()
        for part in first:
            await write(part.message(self._now()))
            self.updates_sent += 1
            last_write = time.monotonic()
        while True:
            wait = self.heartbeat - (time.monotonic() - last_write)
            if wait > 0 and not watcher.ready.is_set():
                try:
                    async with asyncio.timeout(wait):
                        await watcher.ready.wait()
                except TimeoutError:
                    pass
            bodies = watcher.take() if watcher.ready.is_set() else []
            jwks = self._jwks_json()
            # A key change (a log row, or a reload by the poll) sends the new JWK Set.
            changed = jwks if jwks != sent_jwks else ""
            if bodies or changed:
                update = header(
                    sequence=bodies[-1].sequence if bodies else 0,
                    jwks_json=changed,
                    sent_at=self._now(),
                ) + b"".join(b.data for b in bodies)
                sent_jwks = jwks
            elif time.monotonic() - last_write >= self.heartbeat:
                update = header(sequence=0, sent_at=self._now())
            else:
                continue
            await write(update)
            self.updates_sent += 1
            last_write = time.monotonic()
