"""Issue and Refresh: a login starts a session (token family), a refresh rotates its
refresh token. Validation lives in `validation`, revocation in `sessions`, a login's
password check and throttle in `login`."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from service.clock import Clock, to_datetime
from service.domain.access_tokens import AccessTokenCodec, token_lifetime
from service.domain.events import LogRateLimiter, aggregate_key, peer_address
from service.domain.login import PasswordLogins
from service.domain.policy import TokenPolicy
from service.domain.ports import RefreshTokenStorage, SessionStorage
from service.domain.records import CallerInfo, NewSession, RefreshTokenState, SecurityEvent
from service.domain.refresh_tokens import (
    ChildTokens,
    RefreshDecision,
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
    decide_refresh,
    granted_scopes,
    hash_token,
    is_well_formed,
    new_refresh_token,
    raised_user_bound,
    replay_verdict,
    user_bound,
)
from service.domain.revocation import Revocation
from service.domain.sessions import SessionRevocations
from service.domain.telemetry import NoTelemetry, ReplayVerdict, Telemetry
from service.errors import (
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    RefreshTokenInvalid,
    RefreshTokenReused,
    ScopeNotAllowed,
    SessionRevoked,
)

log = logging.getLogger(__name__)

UNKNOWN_AUDIENCE = "is not an audience this service issues tokens for"


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a successful Issue or Refresh returns."""

    access_token: str
    access_token_expires_at: float
    refresh_token: str
    refresh_token_expires_at: float
    session_id: str
    scopes: tuple[str, ...]


def _reuse_event(state: RefreshTokenState, newly_revoked: bool, peer: str | None) -> SecurityEvent:
    """What reuse detection records: once per family a row of its own; into a family that
    is dead already (anyone holding an old token of theirs can repeat this at will) one
    row per session and window, counted."""
    if newly_revoked:
        return SecurityEvent(
            kind="refresh_token_reused",
            subject=str(state.user_id),
            session_id=state.session_id,
            peer=peer,
        )
    return SecurityEvent(
        kind="refresh_token_reused",
        subject=str(state.user_id),
        session_id=state.session_id,
        peer=peer,
        detail={"unchanged": "true"},
        aggregate_key=aggregate_key(str(state.session_id)),
    )


def _replay_event(
    state: RefreshTokenState, verdict: tuple[ReplayVerdict, str | None], peer: str | None
) -> SecurityEvent:
    """What a replay within the grace window records, one row per session, verdict and
    window."""
    judged, reason = verdict
    detail: dict[str, str] = {"verdict": judged}
    if reason:
        # The peer column names who replayed; this, who rotated.
        detail |= {"reason": reason, "rotated_by": peer_address(state.rotated_by_peer)}
    return SecurityEvent(
        kind="refresh_token_replayed",
        subject=str(state.user_id),
        session_id=state.session_id,
        peer=peer,
        detail=detail,
        aggregate_key=aggregate_key(str(state.session_id), judged, reason),
    )


class TokenService:
    """Issues and rotates tokens; one per server process."""

    def __init__(
        self,
        *,
        policy: TokenPolicy,
        sessions: SessionStorage,
        refresh_tokens: RefreshTokenStorage,
        logins: PasswordLogins,
        revocations: SessionRevocations,
        codec: AccessTokenCodec,
        refresh_secret: bytes | None,
        clock: Clock,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._policy = policy
        # The policy's windows as timedeltas, made once (each refresh uses them).
        self._idle_ttl = policy.idle_ttl
        self._reuse_grace = policy.reuse_grace
        self._sessions = sessions
        self._refresh_tokens = refresh_tokens
        self._logins = logins
        self._revocations = revocations
        self._codec = codec
        # None in an operator's command (`authsvc users`): it revokes, never issues, and
        # must not need (or create) key material.
        self._refresh_secret_or_none = refresh_secret
        self._child_tokens = None if refresh_secret is None else ChildTokens(refresh_secret)
        self._clock = clock
        self._telemetry = telemetry or NoTelemetry()
        # What a client can repeat at will is logged once per source and window.
        self._limited_log = LogRateLimiter(log, window=policy.log_window, now=clock.now)
        self.issuable_audiences = policy.issuable_audiences
        """What Issue may name as `audience` (the default one and AUTH_AUDIENCES)."""

    @property
    def _refresh_secret(self) -> bytes:
        if self._refresh_secret_or_none is None:
            raise RuntimeError("this TokenService was built without key material")
        return self._refresh_secret_or_none

    def _child_token(self, parent: str) -> str:
        if self._child_tokens is None:
            raise RuntimeError("this TokenService was built without key material")
        return self._child_tokens.derive(parent)

    # Issue

    async def issue(
        self,
        *,
        username: str,
        password: str,
        scopes: tuple[str, ...],
        audience: str | None,
        caller: CallerInfo,
    ) -> TokenPair:
        aud = audience or self._policy.audience
        if aud not in self.issuable_audiences:
            raise InvalidArgument([FieldViolation("audience", UNKNOWN_AUDIENCE)])
        authenticated = await self._logins.authenticate(username, password, caller)
        user = authenticated.user
        now = self._clock.now()
        granted = scopes or user.scopes
        if not set(granted) <= set(user.scopes):
            # The password was right: for the throttle, a success.
            await self._logins.settle(authenticated)
            raise ScopeNotAllowed()
        session_id = uuid.uuid4()
        refresh_token = new_refresh_token()
        session_expires = now + self._policy.refresh_absolute_ttl
        token_expires = min(now + self._policy.refresh_idle_ttl, session_expires)
        # The access token's exp is stored with the session before it is signed: how long
        # a revocation of this session must be remembered.
        issued_at, access_expires = token_lifetime(now, self._policy.access_ttl)
        # The throttle's settlement goes with the session, in its statement.
        created = await self._logins.start_session(
            authenticated,
            self._sessions.create_session(
                NewSession(
                    id=session_id,
                    user_id=user.id,
                    scopes=granted,
                    audience=aud,
                    created_at=to_datetime(now),
                    expires_at=to_datetime(session_expires),
                    first_token_hash=hash_token(refresh_token),
                    first_token_expires_at=to_datetime(token_expires),
                    access_expires_at=to_datetime(access_expires),
                    peer=caller.peer,
                    user_agent=caller.user_agent,
                ),
                SecurityEvent(
                    kind="login_succeeded",
                    subject=str(user.id),
                    session_id=session_id,
                    peer=caller.peer,
                ),
                verified_hash=user.password_hash,
                max_sessions=self._policy.max_sessions_per_user,
                settlement=authenticated.settlement,
            ),
        )
        if created is None:
            # Disabled, or the password changed, while we were checking it.
            self._telemetry.login("failed")
            raise InvalidCredentials()
        generation, evicted = created
        self._telemetry.login("succeeded")
        if evicted:
            # Over the cap: the oldest sessions went, and this process refuses their tokens now.
            self._revocations.remember(evicted, "session_limit")
        await self._logins.upgrade_hash(user, password)
        access = self._codec.sign(
            subject=str(user.id),
            session_id=str(session_id),
            audience=aud,
            scopes=granted,
            issued_at=issued_at,
            expires_at=access_expires,
            generation=generation,
        )
        return TokenPair(
            access_token=access.token,
            access_token_expires_at=access.expires_at,
            refresh_token=refresh_token,
            refresh_token_expires_at=token_expires,
            session_id=str(session_id),
            scopes=granted,
        )

    # Refresh

    async def refresh(self, refresh_token: str, *, caller: CallerInfo) -> TokenPair:
        """Rotate a refresh token. The common case (a fresh token of a live session) is one
        step of the store (`rotate_if_fresh`): the token locked, judged and rotated at once.
        The rest (a used token, a revocation that came meanwhile) is one transaction through
        the port, the token's row locked while `decide_refresh` judges it and the decision
        is written; the answer (or the error) once it has committed."""
        if not is_well_formed(refresh_token):
            raise RefreshTokenInvalid()
        child = self._child_token(refresh_token)
        clock_now = self._clock.now()
        now = to_datetime(clock_now)
        # Stored as the session's bound by the same statement as the rotation, then signed.
        issued_at, access_expires = token_lifetime(clock_now, self._policy.access_ttl)
        signed_until = to_datetime(access_expires)
        token_hash, child_hash = hash_token(refresh_token), hash_token(child)
        revoked: list[Revocation] = []
        newly_revoked = False
        verdict: tuple[ReplayVerdict, str | None] = ("retry", None)
        state, rotated = await self._refresh_tokens.rotate_if_fresh(
            token_hash,
            now=now,
            child_hash=child_hash,
            idle_expires_at=now + self._idle_ttl,
            audiences=self.issuable_audiences,
            access_expires_at=signed_until,
            user_bound=raised_user_bound(signed_until),
            peer=caller.peer,
        )
        decision = self._decide(state, now=now, child_hash=child_hash)
        if rotated:
            if not isinstance(decision, Rotate):
                # The statement's conditions are decide_refresh's (a differential test
                # holds them to it): this is a bug, never a client's doing.
                raise RuntimeError("the store rotated a token that decide_refresh would not")
        elif state is not None and (state.used_at is not None or isinstance(decision, Rotate)):
            # A used token (a replay, reuse) needs its child's state, read fresh under the
            # lock; a rotation that a revocation stopped is judged again on the new state.
            # (A refusal of an unused token, read under its lock, stands as it is.)
            state, decision, revoked, newly_revoked, verdict = await self._refresh_under_lock(
                token_hash, child_hash=child_hash, now=now, signed_until=signed_until, caller=caller
            )
        match decision:
            case Reject():
                raise decision.error()
            case RevokeForReuse():
                assert state is not None
                self._reuse_detected(state, revoked, newly_revoked)
                raise RefreshTokenReused()
            case Rotate():
                assert state is not None
                child_expires_at = decision.child_expires_at
            case Replay():
                assert state is not None
                assert state.child_expires_at is not None
                child_expires_at = state.child_expires_at
                self._replayed(state, verdict, caller.peer)
        scopes = granted_scopes(state)
        session_id = str(state.session_id)
        access = self._codec.sign(
            subject=str(state.user_id),
            session_id=session_id,
            audience=state.session_audience,
            scopes=scopes,
            issued_at=issued_at,
            expires_at=access_expires,
            generation=state.session_generation,
        )
        return TokenPair(
            access_token=access.token,
            access_token_expires_at=access.expires_at,
            refresh_token=child,
            refresh_token_expires_at=child_expires_at.timestamp(),
            session_id=session_id,
            scopes=scopes,
        )

    def _decide(
        self, state: RefreshTokenState | None, *, now: datetime, child_hash: bytes
    ) -> RefreshDecision:
        return decide_refresh(
            state,
            now=now,
            grace=self._reuse_grace,
            idle_ttl=self._idle_ttl,
            child_hash=child_hash,
            audiences=self.issuable_audiences,
        )

    async def _refresh_under_lock(
        self,
        token_hash: bytes,
        *,
        child_hash: bytes,
        now: datetime,
        signed_until: datetime,
        caller: CallerInfo,
    ) -> tuple[
        RefreshTokenState | None,
        RefreshDecision,
        list[Revocation],
        bool,
        tuple[ReplayVerdict, str | None],
    ]:
        """The refresh in one transaction of several statements: the state, the decision
        (a write that a revocation stopped: SessionRevoked), the sessions revoked for reuse
        and whether this call revoked them, and a replay's verdict."""
        revoked: list[Revocation] = []
        newly_revoked = False
        verdict: tuple[ReplayVerdict, str | None] = ("retry", None)
        async with self._refresh_tokens.refreshing() as refreshing:
            state = await refreshing.lock(token_hash)
            decision = self._decide(state, now=now, child_hash=child_hash)
            match decision:
                case Rotate():
                    assert state is not None
                    if not await refreshing.rotate(
                        state,
                        decision,
                        now=now,
                        access_expires_at=signed_until,
                        peer=caller.peer,
                        user_bound=user_bound(state, signed_until),
                    ):
                        decision = Reject(SessionRevoked)
                case Replay():
                    # The child exists already; the new access token's exp is what to write.
                    assert state is not None
                    if not await refreshing.raise_bounds(
                        state,
                        access_expires_at=signed_until,
                        user_bound=user_bound(state, signed_until),
                    ):
                        decision = Reject(SessionRevoked)
                    else:
                        # A replay of the child within the grace window is recorded too.
                        verdict = replay_verdict(state, now=now, peer=caller.peer)
                        await refreshing.record_event(
                            _replay_event(state, verdict, caller.peer), now=now
                        )
                case RevokeForReuse():
                    assert state is not None
                    revoked, newly_revoked = await refreshing.revoke_for_reuse(state, now=now)
                    # Recorded even when the family was dead already: each replay is a theft
                    # signal.
                    await refreshing.record_event(
                        _reuse_event(state, newly_revoked, caller.peer), now=now
                    )
        return state, decision, revoked, newly_revoked, verdict

    def _reuse_detected(
        self, state: RefreshTokenState, revoked: list[Revocation], newly_revoked: bool
    ) -> None:
        self._telemetry.refresh_reuse_detected()
        # Revoked before or now, this process refuses the family's tokens at once.
        self._revocations.remember(revoked, "reuse", counted=newly_revoked)
        if newly_revoked:
            log.warning(
                "security: refresh token reuse detected; session %s of subject %s revoked",
                state.session_id,
                state.user_id,
            )
        else:
            self._limited_log.warning(
                ("refresh_token_reused", str(state.session_id)),
                "security: refresh token reuse detected again; session %s of subject %s "
                "was revoked already",
                state.session_id,
                state.user_id,
            )

    def _replayed(
        self, state: RefreshTokenState, verdict: tuple[ReplayVerdict, str | None], peer: str | None
    ) -> None:
        judged, reason = verdict
        self._telemetry.refresh_replayed(judged)
        if judged == "suspicious":
            self._limited_log.warning(
                ("refresh_token_replayed", str(state.session_id)),
                "security: rotated refresh token replayed within the grace window (%s); "
                "session %s of subject %s, from %s",
                reason,
                state.session_id,
                state.user_id,
                peer_address(peer),
            )
