"""What Validate needs to know without a database round trip.

`RevocationState` holds the ids of revoked sessions whose access tokens could
still be alive; past `revoked_at + access_ttl + leeway` every token of such a
session has expired anyway, so the set stays bounded. It is filled at start,
kept current by the database's notifications (see `service.store.revocation_feed`),
and updated directly by this process's own revocations.

`VerifiedTokenCache` remembers tokens whose signature and claims were verified,
so seeing a token again costs a dictionary lookup instead of a signature check.
Expiry, revocation, audience and scope are still checked on every call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

from service.domain.access_tokens import AccessClaims

# Tokens are at most a few seconds older than the revocation that races them
# (a Refresh committing just before a Revoke); keep entries this much longer.
REVOCATION_MARGIN_SECONDS = 60.0


class RevocationState:
    """Revoked session ids, each kept until its last access token has expired."""

    def __init__(self, *, access_ttl: int, leeway: int) -> None:
        self._keep_for = access_ttl + leeway + REVOCATION_MARGIN_SECONDS
        self._revoked: dict[str, float] = {}  # session id -> forget after (epoch seconds)
        self.synced_at: float | None = None
        """When the state was last known to match the database (None: never, or stale)."""
        self.lag: float | None = None
        """Seconds between the latest notified revocation and this process hearing it."""

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._revoked

    def add(self, revocations: Iterable[tuple[str, float]]) -> None:
        """Record (session id, revoked at) pairs."""
        keep_for = self._keep_for
        for session_id, revoked_at in revocations:
            forget_after = revoked_at + keep_for
            if self._revoked.get(session_id, 0.0) < forget_after:
                self._revoked[session_id] = forget_after

    def prune(self, now: float) -> int:
        """Forget sessions whose access tokens have all expired; how many were dropped."""
        expired = [sid for sid, forget_after in self._revoked.items() if forget_after <= now]
        for sid in expired:
            del self._revoked[sid]
        return len(expired)

    def window_start(self, now: float) -> float:
        """Revocations older than this no longer matter."""
        return now - self._keep_for

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
