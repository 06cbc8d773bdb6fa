"""The storage the domain needs, one port per kind of data: small protocols the domain
owns and the store implements (structurally: it inherits nothing from here).

Each method is one transaction unless it says otherwise; every write that must happen
together with another (a change and its security event, a revocation and its log row) is
one call. Unavailable storage raises `DatabaseUnavailable`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from service.domain.records import (
    NewSession,
    RefreshTokenState,
    SecurityEvent,
    SessionRecord,
    SigningKeyRecord,
    ThrottleSettlement,
    ThrottleState,
    UserRecord,
)
from service.domain.refresh_tokens import Rotate
from service.domain.revocation import Revocation, UserRevocation


class SecurityEventStorage(Protocol):
    """The audit trail."""

    async def record_event(
        self, event: SecurityEvent, *, now: datetime, occurrences: int = 1
    ) -> None:
        """Record `event` (`occurrences` times over, counted in one row per kind, key and
        window for an aggregated one)."""


class UserStorage(Protocol):
    """User accounts. A change that ends every session of the user revokes them in its
    own transaction and returns the revocation."""

    async def create_user(
        self,
        *,
        user_id: uuid.UUID,
        username: str,
        username_key: str,
        password_hash: str,
        scopes: tuple[str, ...],
        now: datetime,
    ) -> UserRecord:
        """A new user; UserAlreadyExists if a live user has the same `username_key`."""

    async def find_user(self, username_key: str) -> UserRecord | None: ...

    async def find_user_by_id(self, user_id: uuid.UUID) -> UserRecord | None: ...

    async def list_users(self) -> list[UserRecord]: ...

    async def set_password_hash(
        self, user_id: uuid.UUID, password_hash: str, *, now: datetime, replacing: str | None
    ) -> None:
        """Store a new hash; with `replacing`, only if the stored hash is still that one."""

    async def change_user(
        self,
        user_id: uuid.UUID,
        *,
        now: datetime,
        password_hash: str | None = None,
        disabled: bool | None = None,
        revoke_reason: str | None = None,
        events: list[SecurityEvent],
    ) -> tuple[UserRevocation | None, int] | None:
        """New hash and/or disabled flag, every session revoked with `revoke_reason`, the
        events: all or nothing. The revocation and how many sessions it ended; None if
        there is no such user."""

    async def delete_user(
        self, user_id: uuid.UUID, *, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int] | None:
        """Mark deleted and revoke every session; None if there is no such user."""


class SessionStorage(Protocol):
    """Sessions (token families) and their revocation."""

    async def create_session(
        self,
        session: NewSession,
        event: SecurityEvent,
        *,
        verified_hash: str,
        max_sessions: int,
        settlement: ThrottleSettlement | None = None,
    ) -> tuple[int, list[Revocation]] | None:
        """Start a family (session, first token, login event) if the user is still enabled
        with `verified_hash`, revoking their oldest sessions beyond `max_sessions`, and
        apply the login's throttle `settlement` (also if the user changed), all in one
        transaction: the session's generation and the sessions revoked; None if the user
        changed."""

    async def session_of_refresh_token(self, token_hash: bytes) -> uuid.UUID | None: ...

    async def live_session_owner(self, session_id: uuid.UUID) -> uuid.UUID | None:
        """The user of a session not revoked yet; None for a revoked or unknown one."""

    async def session_exists(self, session_id: uuid.UUID) -> bool: ...

    async def live_sessions(
        self,
        user_id: uuid.UUID,
        *,
        now: datetime,
        limit: int,
        before: tuple[datetime, uuid.UUID] | None,
    ) -> list[SessionRecord]:
        """A user's refreshable sessions, newest first, after the (created_at, id) cursor."""

    async def revoke_session(
        self,
        session_id: uuid.UUID,
        *,
        reason: str,
        now: datetime,
        event: SecurityEvent,
        record_if_unchanged: bool = False,
    ) -> list[Revocation]:
        """Revoke one session: [it] if this call revoked it, else []; the event recorded
        only then, unless `record_if_unchanged`."""

    async def revoke_user_sessions(
        self, user_id: uuid.UUID, *, reason: str, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int]:
        """Revoke every session of a user: the revocation and how many live ones it ended."""


class RefreshTransaction(Protocol):
    """One refresh: one transaction, in which the presented token's row stays locked from
    `lock` on, so every call presenting the same token waits for the one before it."""

    async def lock(self, token_hash: bytes) -> RefreshTokenState | None:
        """The token's state, read fresh after the lock; None for an unknown token."""

    async def rotate(
        self,
        state: RefreshTokenState,
        rotation: Rotate,
        *,
        now: datetime,
        access_expires_at: datetime,
        peer: str | None,
        user_bound: datetime | None,
    ) -> bool:
        """Mark the token used by `peer`, store its child, raise the session's bound to
        `access_expires_at` (and the user's to `user_bound`, if given); False, changing
        nothing, if the session or every session of its user was revoked meanwhile."""

    async def raise_bounds(
        self, state: RefreshTokenState, *, access_expires_at: datetime, user_bound: datetime | None
    ) -> bool:
        """The bounds alone (a replay signs another access token); False as for `rotate`."""

    async def revoke_for_reuse(
        self, state: RefreshTokenState, *, now: datetime
    ) -> tuple[list[Revocation], bool]:
        """Revoke the token's session: its revocation (also if it was revoked before) and
        whether this call revoked it."""

    async def record_event(self, event: SecurityEvent, *, now: datetime) -> None:
        """Record `event` with the refresh (in its transaction)."""


class RefreshTokenStorage(Protocol):
    """The rotation of refresh tokens."""

    async def rotate_if_fresh(
        self,
        token_hash: bytes,
        *,
        now: datetime,
        child_hash: bytes,
        idle_expires_at: datetime,
        audiences: frozenset[str],
        access_expires_at: datetime,
        user_bound: datetime,
        peer: str | None,
    ) -> tuple[RefreshTokenState | None, bool]:
        """The common case in one step: lock and read the token's state and, exactly when
        `decide_refresh` would rotate it (with the child expiring at the earlier of
        `idle_expires_at` and the session's end), rotate it as `RefreshTransaction.rotate`
        does, the user's bound raised to `user_bound` if the one read is below
        `access_expires_at`. The state as read (None: unknown token) and whether it rotated;
        it writes nothing otherwise (also when a revocation stopped the writes)."""

    def refreshing(self) -> AbstractAsyncContextManager[RefreshTransaction]:
        """A refresh's transaction: committed when the block ends, rolled back if it raises."""


class SigningKeyStorage(Protocol):
    """Signing keys, their private halves sealed; every change announced to the replicas."""

    def bootstrap_lock(self) -> AbstractAsyncContextManager[None]:
        """Held while a replica creates keys or secrets: one at a time, across replicas."""

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored key, retired ones included, oldest first."""

    async def signing_key_versions(self) -> list[tuple[str, bool]]:
        """(kid, retired) of every key."""

    async def insert_signing_key(self, key: SigningKeyRecord, event: SecurityEvent) -> None: ...

    async def retire_signing_keys(
        self, kids: list[str], *, now: datetime, event: SecurityEvent
    ) -> list[str]:
        """Retire keys (wiping their private halves); the kids this call retired."""


class ServerSecretStorage(Protocol):
    """The server's other sealed secrets, by name."""

    def bootstrap_lock(self) -> AbstractAsyncContextManager[None]: ...

    async def server_secret(self, name: str) -> bytes | None: ...

    async def insert_server_secret(self, name: str, sealed: bytes, *, now: datetime) -> None: ...


class ThrottleStorage(Protocol):
    """Login throttle counts, per key, shared by every replica."""

    async def reserve_login_attempt(
        self,
        limits: dict[str, tuple[int, datetime]],
        *,
        now: datetime,
        pending_since: datetime,
        username_key: str | None = None,
    ) -> tuple[list[ThrottleState], bool, UserRecord | None]:
        """One step: lock the keys' rows (made if missing) in key order and, exactly when
        `decide_reservation` would count the attempt (each key's free failures and window
        start in `limits`, pending counts from `pending_since` on), count it, stamped `now`.
        The rows as read under the lock, in key order, whether it was counted, and, for a
        counted attempt given `username_key`, the live user of that key (read after the
        lock, as `UserStorage.find_user` would)."""

    async def settle_login_failure(
        self,
        keys: list[str],
        decide: Callable[[list[ThrottleState]], dict[str, datetime | None]],
    ) -> None:
        """A failed attempt reserved against `keys`: one transaction that locks their rows
        in key order, reads them (missing rows are left out), lets `decide` say until when
        each key waits (`decide_failure_waits`), and takes the attempt off the pending
        count, setting each wait (never shortening one)."""

    async def settle_login_success(self, settlement: ThrottleSettlement) -> None:
        """A success whose settlement no session statement carries."""


class SharedSettingsStorage(Protocol):
    """The settings every replica on one database shares."""

    async def shared_settings(self) -> dict[str, Any]: ...

    async def update_shared_settings(
        self,
        decide: Callable[[Mapping[str, Any]], tuple[dict[str, Any], SecurityEvent | None]],
        *,
        now: datetime,
    ) -> None:
        """Read the record, let `decide` say what to write and why, write both: one
        transaction, under the bootstrap lock."""


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """What one clean-up batch did."""

    examined: int
    """Candidates found (fewer than the batch size: nothing more to do for now)."""
    deleted: int
    repaired: int = 0
    """Rows whose stored purge time was missing or wrong, now computed from their rows."""
    after: tuple[datetime, str] | None = None
    """Where to resume a walk in key order (users), or None."""


class Purger(Protocol):
    """The janitor's turn: each call is one batch, one short transaction."""

    async def purge_batch(
        self,
        table: str,
        cutoff: datetime,
        *,
        batch: int,
        after: tuple[datetime, str] | None = None,
    ) -> PurgeBatch:
        """Delete at most `batch` rows of `table` forgettable before `cutoff`."""

    async def backfill_purge_after(self, *, batch: int) -> PurgeBatch:
        """Compute the purge time of at most `batch` sessions that have none yet."""


class JanitorStorage(Protocol):
    """What the janitor cleans, one replica at a time."""

    def janitor_turn(self) -> AbstractAsyncContextManager[Purger | None]:
        """The janitor's lock while inside (None: another replica's janitor runs)."""

    async def catch_up_user_revocations(self, *, batch: int, max_batches: int) -> int | None:
        """Write users' revocations into their sessions; how many; None if busy elsewhere."""
