"""Records passed between the domain and the store (and, for `CallerInfo`, the API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as stored."""

    id: uuid.UUID
    username: str
    password_hash: str
    scopes: tuple[str, ...]
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewSession:
    """What Issue writes: a session (token family) and its first refresh token."""

    id: uuid.UUID
    user_id: uuid.UUID
    scopes: tuple[str, ...]
    audience: str
    created_at: datetime
    expires_at: datetime
    first_token_hash: bytes
    first_token_expires_at: datetime
    access_expires_at: datetime
    """The `exp` of the access token the login signs: the session's first bound."""
    peer: str | None
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A stored session, as the admin API lists it."""

    id: uuid.UUID
    user_id: uuid.UUID
    scopes: tuple[str, ...]
    audience: str
    created_at: datetime
    expires_at: datetime
    last_refreshed_at: datetime | None
    peer: str | None
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class RefreshTokenState:
    """A presented refresh token with everything needed to decide its fate."""

    token_hash: bytes
    session_id: uuid.UUID
    user_id: uuid.UUID
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None
    child_hash: bytes | None
    child_expires_at: datetime | None
    child_used: bool
    session_scopes: tuple[str, ...]
    session_audience: str
    session_expires_at: datetime
    session_revoked: bool
    user_scopes: tuple[str, ...]
    user_disabled: bool
    rotated_by_peer: str | None = None
    """Who made the session's latest rotation (read only for a used token: its own)."""
    session_generation: int = 0
    """The user's session generation when the session started (the tokens' `ugen`)."""
    user_access_expires_max: datetime | None = None
    """The user's bound as read (see `user_bound`); None: not known."""


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """A signing key as stored: the private half sealed under the KEK (None once retired)."""

    kid: str
    alg: str
    public_jwk: dict[str, str]
    private_key_sealed: bytes | None
    created_at: datetime
    activates_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Something an operator should be able to see later (logins, theft, revocations)."""

    kind: str
    subject: str | None = None
    session_id: uuid.UUID | None = None
    peer: str | None = None
    detail: dict[str, str] | None = None
    aggregate_key: str | None = None
    """Set for what a client can repeat cheaply (`service.domain.events`): repeats of
    one kind and key within one window are counted in one row, which keeps this
    event's subject, session, peer and detail (those of the first)."""


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """A login-throttle key's row as a login attempt finds it (locked until it decides)."""

    key: str
    failures: int
    """Failed attempts in the window, including those still being checked."""
    last_failure_at: datetime
    locked_until: datetime | None
    pending: int
    """Attempts still being checked, as of `pending_at` (the latest reservation)."""
    pending_at: datetime | None


@dataclass(frozen=True, slots=True)
class ThrottleSettlement:
    """What a login whose password was right does to its throttle keys (the domain's rule,
    `LoginThrottle.success`): each key gives back the attempt's pending count; the keys in
    `clear` forget their failures and waits, the others take back the failure the attempt
    was counted as and, unless a later attempt came (`last_failure_at` is no longer
    `reserved_at`), the time of their previous failure. The store applies it as given."""

    previous_failure_at: dict[str, datetime]
    """Each key's latest failure before the attempt, in key order."""
    clear: frozenset[str]
    reserved_at: datetime


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """Where a call came from, recorded with sessions and security events."""

    peer: str | None = None
    user_agent: str | None = None
    actor: str | None = None
    """Who acted, for operators' calls: "cli", or "admin:<calling service>"."""

    def detail(self, **detail: str) -> dict[str, str]:
        """An event's detail, with the actor when there is one."""
        return detail if self.actor is None else {**detail, "actor": self.actor}
