"""What Validate needs to know without a database round trip.

`RevocationState` holds the revoked sessions whose access tokens could still be alive, each
until `remembered_until` (its stored latest `exp` + `MAX_LEEWAY` + a margin, whatever the
TTL and leeway are now), and the session generation of users whose every session was
revoked at once. It is filled at start and kept current by the store's revocation feed
and by this process's own revocations. `VerifiedTokenCache` lets a token seen before skip
the signature check (never the expiry, revocation, audience and scope checks).
Why and for how long: docs/design.md, "Tokens and sessions" and "Validate at scale".
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import NamedTuple

from authsvc_client.token_check import Revocations

from service.domain.access_tokens import AccessClaims
from service.settings import MAX_LEEWAY, MAX_SESSIONS_PER_USER

# Replicas' clocks differ a little, and a notification takes a moment: keep entries this
# much longer than the tokens' own lifetime.
REVOKED_COUNT_LIMIT = MAX_SESSIONS_PER_USER
"""A revocation of all a user's sessions counts them up to this many (the largest
AUTH_MAX_SESSIONS_PER_USER), reading a bounded range of the index; `service.store`
counts to it. Users from before the cap may hold more."""


def revoked_count_is_lower_bound(count: int) -> bool:
    """Whether a user-wide revocation's count of `count` sessions may be short of the
    truth (it reached REVOKED_COUNT_LIMIT, where counting stops)."""
    return count >= REVOKED_COUNT_LIMIT


REVOCATION_MARGIN_SECONDS = 60.0
REMEMBER_PAST_BOUND_SECONDS = MAX_LEEWAY + REVOCATION_MARGIN_SECONDS
"""How long past its bound a revocation is remembered (the log's `keep_until` too)."""


# A user's bound is raised this far past the `exp` that needed it, so most refreshes find it
# high enough and write nothing to the user's row; a user's revocation is then remembered
# up to this much longer than strictly needed.
USER_BOUND_STEP_SECONDS = 3600.0


class Revocation(NamedTuple):
    """A revoked session, as the store reports it and notifications carry it."""

    session_id: str
    revoked_at: float
    """Epoch seconds."""
    access_expires_max: float
    """The latest `exp` of any access token the session was issued (epoch seconds)."""


class UserRevocation(NamedTuple):
    """Every session of a user started under a generation below `generation` is revoked."""

    user_id: str
    generation: int
    revoked_at: float
    """Epoch seconds."""
    access_expires_max: float
    """The user's bound when revoked: no token of those sessions expires later."""


def remembered_until(access_expires_max: float) -> float:
    """Until when a revocation must be remembered (and its session kept): no validator
    whose leeway is within `MAX_LEEWAY` accepts any of the session's tokens after it."""
    return access_expires_max + REMEMBER_PAST_BOUND_SECONDS


def forgettable_before(now: float) -> float:
    """Sessions whose `access_expires_max` is older than this need no remembering."""
    return now - REMEMBER_PAST_BOUND_SECONDS


class KeysChanged(NamedTuple):
    """A signing key was added or retired (the log's `keys` rows)."""

    changed_at: float
    keep_until: float


LogRecord = Revocation | UserRevocation | KeysChanged


class LogEntry(NamedTuple):
    """One row of the revocation log: its sequence and what it records."""

    sequence: int
    record: LogRecord


def keep_until(record: LogRecord) -> float:
    """When a log record may be forgotten."""
    if isinstance(record, KeysChanged):
        return record.keep_until
    return remembered_until(record.access_expires_max)


LogListener = Callable[[list[LogEntry], bool], None]
"""Told each batch of entries applied, in log order, and whether the log went back (a
database restored to an older point: what was told before may not hold)."""


class RevocationState:
    """Revoked session ids, each kept until its last access token has expired, and the
    revocation log's entries this process has applied (its `journal`, in log order), from
    which a watcher that was at sequence N gets exactly what came after N."""

    def __init__(self) -> None:
        # The revoked sessions and users, each until it may be forgotten: the sets and the
        # rule that LocalValidator (the client package) applies to the same stream.
        self._revocations = Revocations()
        self._journal: list[LogEntry] = []
        self._listeners: list[LogListener] = []
        self.sequence = 0
        """The log position applied: every entry up to it is in this state."""
        self.horizon = 0
        """Every unexpired entry above this sequence is in the journal (below it, some
        were compacted or pruned: a watcher that far behind gets a snapshot)."""
        self.version = 0
        """Raised by every change (what a cached snapshot compares)."""
        self.forgotten = 0
        """Raised by every prune that forgot something (a cached snapshot is then stale)."""
        self.synced_at: float | None = None
        """When the state was last known to match the database (None: never, or stale)."""
        self.lag: float | None = None
        """Seconds between the latest logged revocation and this process applying it."""

    def subscribe(self, listener: LogListener) -> None:
        """Call `listener` with each batch of entries applied (synchronously, right after
        the state has them)."""
        self._listeners.append(listener)

    def apply(self, entries: Iterable[LogEntry]) -> list[LogEntry]:
        """Apply log entries read in order; those past `sequence` are kept and told to the
        listeners (returned). Entries at or below `sequence` are known already."""
        fresh = [e for e in entries if e.sequence > self.sequence]
        if not fresh:
            return []
        self._absorb(fresh)
        self._journal.extend(fresh)
        self.sequence = fresh[-1].sequence
        for listener in self._listeners:
            listener(fresh, False)
        return fresh

    def reset(self, entries: list[LogEntry], *, sequence: int, horizon: int) -> list[LogEntry]:
        """A full read of the log at `sequence` (its unexpired entries in order, compacted
        through `horizon`). Revocations are added, never replaced: one this process made
        after the read must not vanish. The entries past the previous `sequence` are told
        to the listeners (returned), as if applied."""
        self._absorb(entries)
        rewound = sequence < self.sequence  # a database restored to an older point
        fresh = [e for e in entries if e.sequence > self.sequence]
        self._journal = list(entries)
        self.horizon = sequence if rewound else max(self.horizon, horizon)
        self.sequence = sequence
        for listener in self._listeners:
            listener(fresh, rewound)
        return fresh

    def entries_after(self, sequence: int, *, at_most: int | None = None) -> list[LogEntry] | None:
        """The unexpired entries after `sequence`, in order; None if they are not all held
        (it is below the horizon, or past this state's position) or there are more than
        `at_most` (counted before anything is copied)."""
        if sequence < self.horizon or sequence > self.sequence:
            return None
        start = bisect.bisect_right(self._journal, sequence, key=lambda e: e.sequence)
        if at_most is not None and len(self._journal) - start > at_most:
            return None
        return self._journal[start:]

    def revoked_session_entries(self) -> list[tuple[str, float]]:
        """(session id, forget after) of every revoked session remembered."""
        return list(self._revocations.sessions.items())

    def revoked_user_entries(self) -> list[tuple[str, int, float]]:
        """(user id, generation, forget after) of every user's revocation remembered."""
        return [(uid, gen, until) for uid, (gen, until) in self._revocations.users.items()]

    def _absorb(self, entries: Iterable[LogEntry]) -> None:
        sessions: list[Revocation] = []
        users: list[UserRevocation] = []
        for entry in entries:
            if isinstance(entry.record, Revocation):
                sessions.append(entry.record)
            elif isinstance(entry.record, UserRevocation):
                users.append(entry.record)
        self.add(sessions)
        self.add_users(users)

    def is_token_revoked(self, claims: AccessClaims) -> bool:
        """Whether a token with these claims is revoked: its session is, or its user's
        sessions were all revoked at a later generation (the one rule, `Revocations`')."""
        return self._revocations.is_token_revoked(
            claims.session_id, claims.subject, claims.generation
        )

    def is_revoked(self, session_id: str) -> bool:
        """Whether this session is revoked on its own (a token may be revoked through its
        user too: `is_token_revoked`)."""
        return session_id in self._revocations.sessions

    def is_revoked_for_user(self, user_id: str, generation: int) -> bool:
        """Whether a token of a session that `user_id` started under `generation` is revoked
        through its user."""
        return self._revocations.is_generation_revoked(user_id, generation)

    def add_users(self, revocations: Iterable[UserRevocation]) -> None:
        self.version += 1
        for revocation in revocations:
            self._revocations.add_user(
                revocation.user_id,
                revocation.generation,
                remembered_until(revocation.access_expires_max),
            )

    def add(self, revocations: Iterable[Revocation]) -> None:
        self.version += 1
        for revocation in revocations:
            self._revocations.add_session(
                revocation.session_id, remembered_until(revocation.access_expires_max)
            )

    def prune(self, now: float) -> int:
        """Forget sessions whose access tokens have all expired; how many were dropped."""
        forgotten = self._revocations.prune(now)
        # The journal's expired entries go too; the horizon rises past them (a watcher
        # resuming from below it gets a snapshot, which no longer needs them).
        kept = [e for e in self._journal if keep_until(e.record) > now]
        if len(kept) != len(self._journal):
            dropped = max(e.sequence for e in self._journal if keep_until(e.record) <= now)
            self.horizon = max(self.horizon, dropped)
            self._journal = kept
        if forgotten:
            self.version += 1
            self.forgotten += 1
        return forgotten

    @property
    def revoked_users(self) -> int:
        """How many users' revocations are remembered."""
        return len(self._revocations.users)

    @property
    def journal_size(self) -> int:
        return len(self._journal)

    def __len__(self) -> int:
        return len(self._revocations.sessions)
