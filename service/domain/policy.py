"""The rules tokens are issued and rotated by: lifetimes, the reuse grace window, the
audiences, the session cap. Taken from the settings once, at start."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What the token lifecycle needs to know of the configuration (seconds)."""

    access_ttl: int
    refresh_idle_ttl: int
    """A refresh token unused this long expires."""
    refresh_absolute_ttl: int
    """A session (token family) ends this long after its login, whatever its refreshes."""
    refresh_reuse_grace: int
    """A rotated token presented again within this window is answered, not revoked."""
    audience: str
    """The `aud` of tokens whose Issue names none."""
    audiences: frozenset[str] = frozenset()
    """Further audiences Issue may name."""
    max_sessions_per_user: int = 100
    log_window: float = 300.0
    """What a client can repeat at will is logged once per source and window."""

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenPolicy:
        return cls(
            access_ttl=settings.access_ttl,
            refresh_idle_ttl=settings.refresh_idle_ttl,
            refresh_absolute_ttl=settings.refresh_absolute_ttl,
            refresh_reuse_grace=settings.refresh_reuse_grace,
            audience=settings.audience,
            audiences=settings.audiences,
            max_sessions_per_user=settings.max_sessions_per_user,
            log_window=settings.event_aggregation_window,
        )

    @property
    def issuable_audiences(self) -> frozenset[str]:
        """What Issue may name as `audience` (the default one and the further ones)."""
        return frozenset({self.audience, *self.audiences})

    @property
    def reuse_grace(self) -> timedelta:
        return timedelta(seconds=self.refresh_reuse_grace)

    @property
    def idle_ttl(self) -> timedelta:
        return timedelta(seconds=self.refresh_idle_ttl)
