"""Ending sessions: the one revocation path of this process, and the Revoke operations.

`SessionRevocations` is how anything here revokes: it persists through the port, puts
the revocation into this process's `RevocationState` at once (the revocation log reaches
the other replicas, and this one, a moment later) and counts it. Revocations persisted as part of
another change (a login's session cap, reuse detection, a user's disable, password change
or deletion) are handed to it as well (`remember`, `remember_user`).

Revoke by session id or subject answers OK only when it ended a live session. Every other
outcome (no token; a forged, expired or revoked one; another user's target; an unknown or
malformed one; nothing left to end) is one CallerUnauthenticated, and the work done before
it does not depend on the token's state: whoever holds a stolen token cannot learn whether
it is live without ending a session.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from service.clock import Clock, to_datetime
from service.domain.access_tokens import TokenRejected
from service.domain.events import LogRateLimiter, aggregate_key, peer_address
from service.domain.ports import SecurityEventStorage, SessionStorage
from service.domain.records import CallerInfo, SecurityEvent
from service.domain.refresh_tokens import hash_token, is_well_formed
from service.domain.revocation import Revocation, RevocationState, UserRevocation
from service.domain.telemetry import NoTelemetry, RevocationTarget, Telemetry
from service.domain.validation import AccessTokenValidator, CallerToken
from service.errors import AuthError, CallerUnauthenticated

log = logging.getLogger(__name__)

# Refused Revoke-by-session/subject calls recorded (and logged) per second and process:
# probing is cheap for a client and must not become as many rows and log lines.
REVOKE_REFUSALS_RECORDED_PER_SECOND = 20


def parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class SessionRevocations:
    """Revokes sessions: persisted, refused here at once, counted."""

    def __init__(
        self,
        *,
        sessions: SessionStorage,
        state: RevocationState,
        clock: Clock,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._sessions = sessions
        self._state = state
        self._clock = clock
        self._telemetry = telemetry or NoTelemetry()

    async def revoke_session(
        self,
        session_id: uuid.UUID,
        *,
        reason: str,
        caller: CallerInfo,
        target: RevocationTarget,
        record_unchanged: bool = False,
    ) -> int:
        """Revoke one session: 1 if this call ended it, else 0. Its `session_revoked` event
        is recorded only then, unless `record_unchanged` (an operator's call is recorded
        whatever it changed)."""
        revoked = await self._sessions.revoke_session(
            session_id,
            reason=reason,
            now=to_datetime(self._clock.now()),
            event=SecurityEvent(
                kind="session_revoked",
                session_id=session_id,
                peer=caller.peer,
                detail=caller.detail(reason=reason),
            ),
            record_if_unchanged=record_unchanged,
        )
        return self.remember(revoked, target)

    async def revoke_user_sessions(
        self, user_id: uuid.UUID, *, reason: str, caller: CallerInfo, target: RevocationTarget
    ) -> int:
        """Revoke every session of a user (one row: the user's generation); how many live
        sessions that ended. Refused here at once even if it ended none."""
        revocation, count = await self._sessions.revoke_user_sessions(
            user_id,
            reason=reason,
            now=to_datetime(self._clock.now()),
            event=SecurityEvent(
                kind="sessions_revoked",
                subject=str(user_id),
                peer=caller.peer,
                detail=caller.detail(reason=reason),
            ),
        )
        return self.remember_user(revocation, count, target)

    def remember(
        self, revoked: list[Revocation], target: RevocationTarget, *, counted: bool = True
    ) -> int:
        """Sessions just revoked in the database: refused here at once (not when the log row
        arrives) and, if `counted` (revoked by this call), counted; how many."""
        self._state.add(revoked)
        if revoked and counted:
            self._telemetry.sessions_revoked(target, len(revoked))
        return len(revoked)

    def remember_user(
        self, revocation: UserRevocation, count: int, target: RevocationTarget
    ) -> int:
        """Every session of a user just revoked in the database (`count` live ones): refused
        here at once, and counted; `count`."""
        self._state.add_users([revocation])
        if count:
            self._telemetry.sessions_revoked(target, count)
        return count


class _PerSecondBudget:
    """At most `per_second` takes in each second of the clock."""

    def __init__(self, per_second: int, clock: Clock) -> None:
        self._per_second = per_second
        self._clock = clock
        self._second_started = float("-inf")
        self._taken = 0

    def take(self) -> bool:
        now = self._clock.now()
        if now - self._second_started >= 1.0:
            self._second_started, self._taken = now, 0
        if self._taken >= self._per_second:
            return False
        self._taken += 1
        return True


class RevokeService:
    """auth.v1 Revoke: end the session of a refresh or access token, one session of the
    caller, or every session of the caller (a logout everywhere)."""

    def __init__(
        self,
        *,
        sessions: SessionStorage,
        events: SecurityEventStorage,
        revocations: SessionRevocations,
        validator: AccessTokenValidator,
        clock: Clock,
        log_window: float = 300.0,
    ) -> None:
        self._sessions = sessions
        self._events = events
        self._revocations = revocations
        self._validator = validator
        self._clock = clock
        self._refusals_recorded = _PerSecondBudget(REVOKE_REFUSALS_RECORDED_PER_SECOND, clock)
        # What a client can repeat at will is logged once per source and window.
        self._limited_log = LogRateLimiter(log, window=log_window, now=clock.now)

    async def revoke_refresh_token(self, refresh_token: str, *, caller: CallerInfo) -> int:
        """Revoke the session of a refresh token; 0 for unknown tokens (RFC 7009)."""
        if not is_well_formed(refresh_token):
            return 0
        session_id = await self._sessions.session_of_refresh_token(hash_token(refresh_token))
        if session_id is None:
            return 0
        return await self._revocations.revoke_session(
            session_id, reason="refresh_token_revoked", caller=caller, target="refresh_token"
        )

    async def revoke_access_token(self, access_token: str, *, caller: CallerInfo) -> int:
        """Revoke the session of an access token whose signature verifies (expired is fine)."""
        try:
            claims = await self._validator.signed_claims(access_token)
        except TokenRejected:
            return 0
        session_id = parse_uuid(claims.session_id)
        if session_id is None:
            return 0
        return await self._revocations.revoke_session(
            session_id, reason="access_token_revoked", caller=caller, target="access_token"
        )

    async def revoke_session(
        self, session_id: str, *, caller_token: str | None, caller: CallerInfo
    ) -> int:
        """Revoke a live session of the calling subject."""
        token = await self._validator.caller_token(caller_token)
        sid = parse_uuid(session_id)
        # Looked up whatever the token: the time taken must not tell live from dead.
        owner = None if sid is None else await self._sessions.live_session_owner(sid)
        subject = token.live_subject
        if sid is not None and owner is not None and str(owner) == subject:
            revoked = await self._revocations.revoke_session(
                sid, reason="session_revoked", caller=caller, target="session"
            )
            if revoked:
                return revoked
        raise await self._refused(
            token, caller, target="session_id", target_id=None if sid is None else str(sid)
        )

    async def revoke_subject(
        self, subject: str, *, caller_token: str | None, caller: CallerInfo
    ) -> int:
        """Log a subject out everywhere: every live session of theirs."""
        token = await self._validator.caller_token(caller_token)
        user_id = parse_uuid(subject)
        if user_id is not None and subject == token.live_subject:
            # Remembered here at once even if it ended nothing live (the answer is then the
            # refusal below, as for any other outcome that ends no live session).
            count = await self._revocations.revoke_user_sessions(
                user_id, reason="logout_everywhere", caller=caller, target="subject"
            )
            if count:
                return count
        raise await self._refused(
            token, caller, target="subject", target_id=None if user_id is None else str(user_id)
        )

    async def _refused(
        self, token: CallerToken, caller: CallerInfo, *, target: str, target_id: str | None
    ) -> CallerUnauthenticated:
        """The one refusal, recorded as a `revoke_refused` security event (naming the
        token's session when its signature verified) within the per-second budget."""
        if self._refusals_recorded.take():
            claims = token.claims
            detail = {"target": target, "caller_token": token.state}
            if target_id is not None:
                detail["target_session" if target == "session_id" else "target_subject"] = target_id
            address = peer_address(caller.peer)
            self._limited_log.warning(
                ("revoke_refused", target, token.state, address),
                "security: Revoke by %s refused (caller token %s) from %s",
                target,
                token.state,
                address,
            )
            # Recording must not change the answer (the database may be the trouble).
            with contextlib.suppress(AuthError):
                await self._events.record_event(
                    SecurityEvent(
                        kind="revoke_refused",
                        subject=None if claims is None else claims.subject,
                        session_id=None if claims is None else parse_uuid(claims.session_id),
                        peer=caller.peer,
                        detail=detail,
                        # Repeats by one address, with one token, at one kind of target
                        # share a row (its detail names the first target): the targets are
                        # the client's to vary, and each new one must not be a new row.
                        aggregate_key=aggregate_key(
                            address,
                            target,
                            token.state,
                            "" if claims is None else claims.session_id,
                        ),
                    ),
                    now=to_datetime(self._clock.now()),
                )
        return CallerUnauthenticated()
