"""Refresh tokens: opaque random strings, stored only as SHA-256, rotated on use.

Within one family each token has at most one child. The child is derived from
its parent with an HMAC under a server secret, so a client that presents the
parent again within the grace window gets the *same* child back, although the
database stores no token in plaintext.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.domain.events import peer_address
from service.domain.records import RefreshTokenState
from service.domain.revocation import USER_BOUND_STEP_SECONDS
from service.domain.telemetry import ReplayVerdict
from service.errors import (
    AuthError,
    RefreshTokenExpired,
    RefreshTokenInvalid,
    SessionRevoked,
)

_TOKEN_BYTES = 32  # 256 bits
# A replay this soon after the rotation, from the rotating address, is a client's retry.
RETRY_WITHIN = timedelta(seconds=1)
# base64url of 32 bytes without padding: exactly 43 characters.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_refresh_token() -> str:
    """A fresh token for a new family: 256 bits from the OS CSPRNG, URL-safe."""
    return _encode(secrets.token_bytes(_TOKEN_BYTES))


def derive_child_token(parent: str, secret: bytes) -> str:
    """The one child of `parent`: HMAC-SHA256 under the server's derivation secret."""
    return ChildTokens(secret).derive(parent)


class ChildTokens:
    """`derive_child_token` under one secret, its HMAC keyed once (the server keeps one):
    each child then costs a copy of the keyed state and one message, not an HMAC set up
    from the key."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def derive(self, parent: str) -> str:
        mac = self._keyed.copy()
        mac.update(parent.encode("ascii"))
        return _encode(mac.digest())


def hash_token(token: str) -> bytes:
    """What the database stores and looks up: SHA-256 of the token text."""
    return hashlib.sha256(token.encode("ascii")).digest()


def is_well_formed(token: str) -> bool:
    """True if `token` could be one of ours (no database lookup needed otherwise)."""
    return _TOKEN_RE.fullmatch(token) is not None


# What to do with a presented refresh token; chosen by `decide_refresh`.


@dataclass(frozen=True, slots=True)
class Rotate:
    """Mark the token used and store its child."""

    child_hash: bytes
    child_expires_at: datetime


@dataclass(frozen=True, slots=True)
class Replay:
    """Within the grace window: answer with the child the first call created."""


@dataclass(frozen=True, slots=True)
class RevokeForReuse:
    """A rotated token came back: revoke the family."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse with this error; change nothing."""

    error: type[AuthError]


RefreshDecision = Rotate | Replay | RevokeForReuse | Reject


def decide_refresh(
    state: RefreshTokenState | None,
    *,
    now: datetime,
    grace: timedelta,
    idle_ttl: timedelta,
    child_hash: bytes,
    audiences: frozenset[str],
) -> RefreshDecision:
    """Decide the fate of a presented refresh token, with the token row locked.

    Order matters. A rotated token presented again outside the grace window is
    reuse whatever else holds: it tells the caller precisely what happened, and
    every replay of a stolen token is recorded, even into a family that is dead
    already. Reuse is also checked before expiry, so that a thief replaying an
    expired ancestor still kills a live family. A session whose audience is no longer
    among `audiences` (the ones Issue may grant) gets no new token.
    """
    if state is None:
        return Reject(RefreshTokenInvalid)
    live = not (state.session_revoked or state.user_disabled)
    if state.used_at is not None:
        # Only the immediate parent of an unused child may be replayed, and only
        # within the window: older generations, or a used child, mean theft.
        # `grace > 0` on its own: with the window off, a call whose clock read came
        # just before the winner's must not count as "within" a zero-length window.
        child_expiry = state.child_expires_at
        replayable = (
            grace > timedelta(0)
            and now < state.used_at + grace
            and not state.child_used
            and state.child_hash is not None
            and hmac.compare_digest(state.child_hash, child_hash)
        )
        if not replayable or child_expiry is None:
            return RevokeForReuse()
        if not live:
            return Reject(SessionRevoked)
        if now >= child_expiry:
            return Reject(RefreshTokenExpired)
        if state.session_audience not in audiences:
            return Reject(RefreshTokenInvalid)
        return Replay()
    if not live:
        return Reject(SessionRevoked)
    if state.session_audience not in audiences:
        return Reject(RefreshTokenInvalid)
    if now >= state.expires_at or now >= state.session_expires_at:
        return Reject(RefreshTokenExpired)
    child_expires_at = min(now + idle_ttl, state.session_expires_at)
    return Rotate(child_hash=child_hash, child_expires_at=child_expires_at)


def granted_scopes(state: RefreshTokenState) -> tuple[str, ...]:
    """A refresh never widens the grant: the session's scopes the user still holds."""
    held = set(state.user_scopes)
    return tuple(s for s in state.session_scopes if s in held)


def replay_verdict(
    state: RefreshTokenState, *, now: datetime, peer: str | None
) -> tuple[ReplayVerdict, str | None]:
    """Judge a grace-window replay (`Replay`): a "retry" if it comes from the address that
    made the rotation, within `RETRY_WITHIN` of it (a lost response, parallel refreshes
    of one app); else "suspicious", with why: "different_peer", "late", or both
    ("different_peer,late") - a thief racing the owner looks like this."""
    reasons = []
    if peer_address(peer) != peer_address(state.rotated_by_peer):
        reasons.append("different_peer")
    if state.used_at is None or now - state.used_at > RETRY_WITHIN:
        reasons.append("late")
    return ("suspicious", ",".join(reasons)) if reasons else ("retry", None)


def user_bound(state: RefreshTokenState, access_expires_at: datetime) -> datetime | None:
    """What to raise the user's bound to before signing a token of the session expiring at
    `access_expires_at` (a step past it, so that most refreshes write nothing to the
    user's row), or None if the bound read with the token covers it."""
    bound = state.user_access_expires_max
    if bound is not None and bound >= access_expires_at:
        return None
    return raised_user_bound(access_expires_at)


def raised_user_bound(access_expires_at: datetime) -> datetime:
    """What a user's bound is raised to when it is below `access_expires_at`."""
    return access_expires_at + timedelta(seconds=USER_BOUND_STEP_SECONDS)
