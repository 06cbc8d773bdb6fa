"""What the domain tells the outside world about itself (metrics), without knowing how
it is exported: the Prometheus implementation lives in `service.metrics`."""

from __future__ import annotations

from typing import Literal, Protocol

LoginOutcome = Literal["succeeded", "failed", "throttled"]
# What a revocation named: a refresh token, an access token, one session (by id), every
# session of a subject, an admin call, or reuse detection.
RevocationTarget = Literal[
    "refresh_token", "access_token", "session", "subject", "admin", "reuse", "session_limit"
]
# A rotated refresh token presented again within the grace window: a client's own retry
# (the same address, within a second of the rotation) or not.
ReplayVerdict = Literal["retry", "suspicious"]


class Telemetry(Protocol):
    """Counters the domain bumps as things happen (each call must be cheap)."""

    def login(self, outcome: LoginOutcome) -> None: ...

    def refresh_reuse_detected(self) -> None: ...

    def refresh_replayed(self, verdict: ReplayVerdict) -> None: ...

    def sessions_revoked(self, target: RevocationTarget, count: int) -> None: ...

    def signing_key_rotated(self) -> None: ...

    def janitor_deleted(self, table: str, count: int) -> None: ...

    def janitor_failed(self, table: str) -> None: ...


class NoTelemetry:
    """Counts nothing (tests and one-shot CLI commands)."""

    def login(self, outcome: LoginOutcome) -> None:
        pass

    def refresh_reuse_detected(self) -> None:
        pass

    def refresh_replayed(self, verdict: ReplayVerdict) -> None:
        pass

    def sessions_revoked(self, target: RevocationTarget, count: int) -> None:
        pass

    def signing_key_rotated(self) -> None:
        pass

    def janitor_deleted(self, table: str, count: int) -> None:
        pass

    def janitor_failed(self, table: str) -> None:
        pass
