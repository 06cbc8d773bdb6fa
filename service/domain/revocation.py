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

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from service.domain.access_tokens import AccessClaims
from service.settings import MAX_LEEWAY

# Replicas' clocks differ a little, and a notification takes a moment: keep entries this
# much longer than the tokens' own lifetime.
REVOCATION_MARGIN_SECONDS = 60.0


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
    return access_expires_max + MAX_LEEWAY + REVOCATION_MARGIN_SECONDS


def forgettable_before(now: float) -> float:
    """Sessions whose `access_expires_max` is older than this need no remembering."""
    return now - MAX_LEEWAY - REVOCATION_MARGIN_SECONDS


class RevocationState:
    """Revoked session ids, each kept until its last access token has expired."""

    def __init__(self) -> None:
        self._revoked: dict[str, float] = {}  # session id -> forget after (epoch seconds)
        # user id -> (sessions below this generation are revoked, forget after)
        self._users: dict[str, tuple[int, float]] = {}
        self.synced_at: float | None = None
        """When the state was last known to match the database (None: never, or stale)."""
        self.lag: float | None = None
        """Seconds between the latest notified revocation and this process hearing it."""

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._revoked

    def is_revoked_for_user(self, user_id: str, generation: int) -> bool:
        """Whether a token of a session that `user_id` started under `generation` is revoked."""
        entry = self._users.get(user_id)
        return entry is not None and generation < entry[0]

    def add_users(self, revocations: Iterable[UserRevocation]) -> None:
        for revocation in revocations:
            forget_after = remembered_until(revocation.access_expires_max)
            generation, known_until = self._users.get(revocation.user_id, (0, 0.0))
            # Generations only grow, and each one's bound covers the ones before it.
            self._users[revocation.user_id] = (
                max(generation, revocation.generation),
                max(known_until, forget_after),
            )

    def add(self, revocations: Iterable[Revocation]) -> None:
        for revocation in revocations:
            forget_after = remembered_until(revocation.access_expires_max)
            if self._revoked.get(revocation.session_id, 0.0) < forget_after:
                self._revoked[revocation.session_id] = forget_after

    def prune(self, now: float) -> int:
        """Forget sessions whose access tokens have all expired; how many were dropped."""
        expired = [sid for sid, forget_after in self._revoked.items() if forget_after <= now]
        for sid in expired:
            del self._revoked[sid]
        users = [uid for uid, (_, forget_after) in self._users.items() if forget_after <= now]
        for uid in users:
            del self._users[uid]
        return len(expired) + len(users)

    @property
    def revoked_users(self) -> int:
        """How many users' revocations are remembered."""
        return len(self._users)

    def __len__(self) -> int:
        return len(self._revoked)


class VerifiedTokenCache:
    """A bounded map from token digest to verified claims, oldest entries evicted first."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, AccessClaims] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(token: str) -> bytes:
        # A 16-byte digest instead of the token text keeps 100k entries small.
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, key: bytes) -> AccessClaims | None:
        claims = self._entries.get(key)
        if claims is None:
            self.misses += 1
        else:
            self.hits += 1
        return claims

    def put(self, key: bytes, claims: AccessClaims) -> None:
        if self._max_entries <= 0:
            return
        self._entries[key] = claims
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
