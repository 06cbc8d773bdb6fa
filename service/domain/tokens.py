"""The token service: log in, rotate, validate and revoke, over sessions (token families)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol

from service.clock import Clock, to_datetime
from service.domain.access_tokens import (
    AccessClaims,
    AccessTokenCodec,
    TokenProblem,
    TokenRejected,
    token_lifetime,
)
from service.domain.events import LogRateLimiter, aggregate_key, capped, peer_address
from service.domain.passwords import PasswordHasher
from service.domain.ports import (
    RefreshTokenStorage,
    SecurityEventStorage,
    ServerSecretStorage,
    SessionStorage,
    UserStorage,
)
from service.domain.records import NewSession, RefreshTokenState, SecurityEvent, UserRecord
from service.domain.refresh_tokens import (
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
    decide_refresh,
    derive_child_token,
    granted_scopes,
    hash_token,
    is_well_formed,
    new_refresh_token,
    replay_verdict,
    user_bound,
)
from service.domain.revocation import (
    Revocation,
    RevocationState,
    UserRevocation,
    VerifiedTokenCache,
)
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import NoTelemetry, ReplayVerdict, RevocationTarget, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.usernames import username_key
from service.errors import (
    AuthError,
    CallerUnauthenticated,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    LoginThrottled,
    RefreshTokenInvalid,
    RefreshTokenReused,
    ScopeNotAllowed,
    SessionRevoked,
)
from service.secrets_box import SecretBox
from service.settings import Settings

log = logging.getLogger(__name__)

_REFRESH_SECRET = "refresh-token-derivation"
# Refused Revoke-by-session/subject calls recorded (and logged) per second and process:
# probing is cheap for a client and must not become as many rows and log lines.
REVOKE_REFUSALS_RECORDED_PER_SECOND = 20

UNKNOWN_AUDIENCE = "is not an audience this service issues tokens for"

CallerTokenState = Literal["none", "invalid", "expired", "revoked", "live"]

CHECKS_PER_HASHING_THREAD = 4
"""Password checks a process runs at once, per hashing thread: enough to keep the
threads busy, few enough that checks whose callers left cannot pile up."""
BUSY_WAIT_FIRST = 0.01
BUSY_WAIT_MAX = 0.2
"""How long a login whose throttle keys are busy first waits, doubling up to this."""


def _log_unexpected_failure(check: asyncio.Task[object]) -> None:
    """A check whose caller left has nobody to report an unexpected error: log it."""
    error = None if check.cancelled() else check.exception()
    if error is not None and not isinstance(error, AuthError):
        log.error("a password check whose caller left failed", exc_info=error)


@dataclass(frozen=True, slots=True)
class TokenPair:
    """What a successful Issue or Refresh returns."""

    access_token: str
    access_token_expires_at: float
    refresh_token: str
    refresh_token_expires_at: float
    session_id: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Validation:
    """The verdict on an access token: claims when valid, else the problem."""

    claims: AccessClaims | None
    problem: TokenProblem | None
    unknown_kid: str | None = None
    """The token names a key this process has not loaded (see `validate_with_new_keys`)."""


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


async def open_refresh_secret(store: ServerSecretStorage, box: SecretBox) -> bytes | None:
    """The stored refresh secret, opened (KeyDecryptionError under a wrong KEK); None if
    there is none yet."""
    sealed = await store.server_secret(_REFRESH_SECRET)
    return None if sealed is None else box.open(sealed, label=_REFRESH_SECRET)


@dataclass(frozen=True, slots=True)
class CallerToken:
    """The access token a Revoke-by-session/subject caller presented, as verified."""

    state: CallerTokenState
    claims: AccessClaims | None = None
    """Set when its signature verified (live, expired or revoked)."""

    @property
    def live_subject(self) -> str | None:
        return self.claims.subject if self.state == "live" and self.claims else None


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


async def load_refresh_secret(store: ServerSecretStorage, box: SecretBox, *, clock: Clock) -> bytes:
    """The server-wide secret that derives a refresh token's child, shared by replicas."""
    sealed = await store.server_secret(_REFRESH_SECRET)
    if sealed is None:
        async with store.bootstrap_lock():
            sealed = await store.server_secret(_REFRESH_SECRET)
            if sealed is None:
                sealed = box.seal(secrets.token_bytes(32), label=_REFRESH_SECRET)
                await store.insert_server_secret(
                    _REFRESH_SECRET, sealed, now=to_datetime(clock.now())
                )
    return box.open(sealed, label=_REFRESH_SECRET)


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


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


class TokenStorage(
    UserStorage, SessionStorage, RefreshTokenStorage, SecurityEventStorage, Protocol
):
    """What the token service reads and writes."""


class TokenService:
    """Issues, rotates, validates and revokes tokens; one per server process."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: TokenStorage,
        codec: AccessTokenCodec | None,
        hasher: PasswordHasher,
        refresh_secret: bytes | None,
        revocations: RevocationState,
        cache: VerifiedTokenCache,
        clock: Clock,
        throttle: LoginThrottle | None = None,
        telemetry: Telemetry | None = None,
        signing_keys: SigningKeys | None = None,
    ) -> None:
        self._settings = settings
        self._signing_keys = signing_keys
        self._telemetry = telemetry or NoTelemetry()
        self._throttle = throttle
        self._revocations = revocations
        self._cache = cache
        self._store = store
        self._refresh_tokens = store
        # None in an operator's command (`authsvc users`): it revokes, never issues or
        # verifies, and must not need (or create) key material.
        self._codec_or_none = codec
        self._hasher = hasher
        self._refresh_secret_or_none = refresh_secret
        self._clock = clock
        self._check_slots = asyncio.Semaphore(CHECKS_PER_HASHING_THREAD * hasher.threads)
        self._checks: set[asyncio.Task[UserRecord | None]] = set()
        # What a client can repeat at will is logged once per source and window.
        self._limited_log = LogRateLimiter(
            log, window=settings.event_aggregation_window, now=clock.now
        )
        self._refusals_recorded = _PerSecondBudget(REVOKE_REFUSALS_RECORDED_PER_SECOND, clock)
        self.issuable_audiences = frozenset({settings.audience, *settings.audiences})
        """What Issue may name as `audience` (the default one and AUTH_AUDIENCES)."""

    @property
    def _codec(self) -> AccessTokenCodec:
        if self._codec_or_none is None:
            raise RuntimeError("this TokenService was built without key material")
        return self._codec_or_none

    @property
    def _refresh_secret(self) -> bytes:
        if self._refresh_secret_or_none is None:
            raise RuntimeError("this TokenService was built without key material")
        return self._refresh_secret_or_none

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
        aud = audience or self._settings.audience
        if aud not in self.issuable_audiences:
            raise InvalidArgument([FieldViolation("audience", UNKNOWN_AUDIENCE)])
        # Looked up, and throttled, by the canonical key: `Alice` is `alice`'s account, and
        # varying the case must not give a guesser fresh allowances.
        throttle_keys = LoginThrottle.keys(username_key(username), caller.peer)
        try:
            user = await self._checked_user(username, password, throttle_keys, caller)
        except LoginThrottled:
            # Refused before any hashing: the cheapest call there is. One row and one log
            # line per address and window (an attacker picks the usernames).
            address = peer_address(caller.peer)
            await self._store.record_event(
                SecurityEvent(
                    kind="login_throttled",
                    peer=caller.peer,
                    detail={"username": capped(username)},
                    aggregate_key=aggregate_key(address),
                ),
                now=to_datetime(self._clock.now()),
            )
            self._limited_log.warning(
                ("login_throttled", address), "security: login throttled (peer %s)", address
            )
            self._telemetry.login("throttled")
            raise
        now = self._clock.now()
        granted = scopes or user.scopes
        if not set(granted) <= set(user.scopes):
            raise ScopeNotAllowed()
        session_id = uuid.uuid4()
        refresh_token = new_refresh_token()
        session_expires = now + self._settings.refresh_absolute_ttl
        token_expires = min(now + self._settings.refresh_idle_ttl, session_expires)
        # The access token's exp is stored with the session before it is signed: how long
        # a revocation of this session must be remembered.
        issued_at, access_expires = token_lifetime(now, self._settings.access_ttl)
        created = await self._store.create_session(
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
            max_sessions=self._settings.max_sessions_per_user,
        )
        if created is None:
            # Disabled, or the password changed, while we were checking it.
            self._telemetry.login("failed")
            raise InvalidCredentials()
        generation, evicted = created
        self._telemetry.login("succeeded")
        if evicted:
            # Over the cap: the oldest sessions went, and this process refuses their tokens now.
            self._revoked_here(evicted, "session_limit")
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._hasher.hash(password)
            await self._store.set_password_hash(
                user.id, new_hash, now=to_datetime(now), replacing=user.password_hash
            )
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

    async def _checked_user(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> UserRecord:
        """The user, once their password is checked (InvalidCredentials if it is wrong).

        A check, once started, runs to its end in a task of its own whatever happens to
        its caller (a deadline, a cancelled call), so every password checked is counted
        and recorded. Slots bound those tasks; waiting for one costs and counts nothing.
        """
        busy_wait = BUSY_WAIT_FIRST
        while True:
            await self._check_slots.acquire()
            check = asyncio.create_task(
                self._check_password(username, password, throttle_keys, caller)
            )
            self._checks.add(check)
            check.add_done_callback(self._check_ended)
            try:
                user = await asyncio.shield(check)
            except asyncio.CancelledError:
                check.add_done_callback(_log_unexpected_failure)
                raise
            if user is not None:
                return user
            await asyncio.sleep(busy_wait)
            busy_wait = min(2 * busy_wait, BUSY_WAIT_MAX)

    async def _check_password(
        self, username: str, password: str, throttle_keys: list[str], caller: CallerInfo
    ) -> UserRecord | None:
        """Count the attempt, check the password, settle the count: the user, or None
        (nothing counted or checked) while the throttle keys are busy. Holds a slot."""
        throttle = self._throttle
        try:
            reservation = None
            if throttle is not None:
                reservation = await throttle.reserve(throttle_keys)
                if reservation is None:
                    return None
            user = await self._store.find_user(username_key(username))
            # Unknown users are verified against a dummy hash: the same work, the same answer.
            matches = await self._hasher.verify(
                None if user is None else user.password_hash, password
            )
            now = self._clock.now()
            if user is None or not matches or user.disabled:
                if throttle is not None and reservation is not None:
                    await throttle.failed(reservation)
                await self._store.record_event(
                    SecurityEvent(
                        kind="login_failed",
                        subject=None if user is None else str(user.id),
                        peer=caller.peer,
                        detail={"username": capped(username)},
                        aggregate_key=aggregate_key(
                            peer_address(caller.peer), username_key(username)
                        ),
                    ),
                    now=to_datetime(now),
                )
                self._telemetry.login("failed")
                raise InvalidCredentials()
            if throttle is not None and reservation is not None:
                await throttle.succeeded(reservation)
            return user
        finally:
            self._check_slots.release()

    def _check_ended(self, check: asyncio.Task[UserRecord | None]) -> None:
        self._checks.discard(check)
        if not check.cancelled():
            check.exception()  # seen by the caller if it still waits; else expected

    async def finish_password_checks(self) -> None:
        """Wait for the checks still running (at shutdown, before the pool closes)."""
        await asyncio.gather(*self._checks, return_exceptions=True)

    # Refresh

    async def refresh(self, refresh_token: str, *, caller: CallerInfo) -> TokenPair:
        """Rotate a refresh token: one transaction through the port, the token's row locked
        while `decide_refresh` judges it and the decision is written; the answer (or the
        error) once it has committed."""
        if not is_well_formed(refresh_token):
            raise RefreshTokenInvalid()
        child = derive_child_token(refresh_token, self._refresh_secret)
        clock_now = self._clock.now()
        now = to_datetime(clock_now)
        # Stored as the session's bound by the same statement as the rotation, then signed.
        issued_at, access_expires = token_lifetime(clock_now, self._settings.access_ttl)
        signed_until = to_datetime(access_expires)
        revoked: list[Revocation] = []
        newly_revoked = False
        verdict: tuple[ReplayVerdict, str | None] = ("retry", None)
        async with self._refresh_tokens.refreshing() as refreshing:
            state = await refreshing.lock(hash_token(refresh_token))
            decision = decide_refresh(
                state,
                now=now,
                grace=timedelta(seconds=self._settings.refresh_reuse_grace),
                idle_ttl=timedelta(seconds=self._settings.refresh_idle_ttl),
                child_hash=hash_token(child),
                audiences=self.issuable_audiences,
            )
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
        access = self._codec.sign(
            subject=str(state.user_id),
            session_id=str(state.session_id),
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
            session_id=str(state.session_id),
            scopes=scopes,
        )

    def _reuse_detected(
        self, state: RefreshTokenState, revoked: list[Revocation], newly_revoked: bool
    ) -> None:
        self._telemetry.refresh_reuse_detected()
        # Revoked before or now, this process refuses the family's tokens at once.
        self._revocations.add(revoked)
        if newly_revoked:
            self._telemetry.sessions_revoked("reuse", len(revoked))
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

    # Validate

    def validate(
        self, access_token: str, *, required_scopes: tuple[str, ...], audience: str | None
    ) -> Validation:
        """The hot path: CPU only, no awaits, no database."""
        try:
            claims = self._verified(access_token)
        except TokenRejected as rejected:
            return Validation(
                claims=None, problem=rejected.problem, unknown_kid=rejected.unknown_kid
            )
        if audience and audience not in claims.audiences:
            return Validation(claims=None, problem=TokenProblem.WRONG_AUDIENCE)
        if not set(required_scopes) <= set(claims.scopes):
            return Validation(claims=None, problem=TokenProblem.INSUFFICIENT_SCOPE)
        return Validation(claims=claims, problem=None)

    async def validate_with_new_keys(
        self, access_token: str, *, required_scopes: tuple[str, ...], audience: str | None
    ) -> Validation:
        """`validate`, except that a token naming a key this process has not loaded yet (one
        rotated in on another replica a moment ago, whose NOTIFY is late) makes it look for
        new keys once, rate-limited, before answering."""
        result = self.validate(access_token, required_scopes=required_scopes, audience=audience)
        if await self._found_new_key(result.unknown_kid):
            result = self.validate(access_token, required_scopes=required_scopes, audience=audience)
        return result

    def _verified(self, access_token: str) -> AccessClaims:
        """Signature, claims, lifetime and revocation: all but audience and scope.

        No database round trip: revocations come from the in-memory state, and a
        token verified before skips the signature check (never the others).
        """
        claims = self._signed(access_token)
        self._codec.check_lifetime(claims)
        if self._revocations.is_revoked(claims.session_id) or self._revocations.is_revoked_for_user(
            claims.subject, claims.generation
        ):
            raise TokenRejected(TokenProblem.REVOKED)
        return claims

    def _signed(self, access_token: str) -> AccessClaims:
        """Signature and claims, from the cache when verified before; lifetime unchecked."""
        key = self._cache.key(access_token)
        claims = self._cache.get(key)
        if claims is None:
            claims = self._codec.verify(access_token, check_time=False)
            self._cache.put(key, claims)
        return claims

    # Revoke

    async def revoke_refresh_token(self, refresh_token: str, *, caller: CallerInfo) -> int:
        """Revoke the session of a refresh token; 0 for unknown tokens (RFC 7009)."""
        if not is_well_formed(refresh_token):
            return 0
        session_id = await self._store.session_of_refresh_token(hash_token(refresh_token))
        if session_id is None:
            return 0
        return await self._revoke_session(
            session_id, "refresh_token_revoked", caller, "refresh_token"
        )

    async def revoke_access_token(self, access_token: str, *, caller: CallerInfo) -> int:
        """Revoke the session of an access token whose signature verifies (expired is fine)."""
        try:
            claims = await self._with_new_keys(
                lambda: self._codec.verify(access_token, check_time=False)
            )
        except TokenRejected:
            return 0
        session_id = _parse_uuid(claims.session_id)
        if session_id is None:
            return 0
        return await self._revoke_session(
            session_id, "access_token_revoked", caller, "access_token"
        )

    # Revoke by session id or subject answers OK only when it ended a live session. Every
    # other outcome (no token; a forged, expired or revoked one; another user's target; an
    # unknown or malformed one; nothing left to end) is one CallerUnauthenticated, and the
    # work done before it does not depend on the token's state: whoever holds a stolen
    # token cannot learn whether it is live without ending a session.

    async def revoke_session(
        self, session_id: str, *, caller_token: str | None, caller: CallerInfo
    ) -> int:
        """Revoke a live session of the calling subject."""
        token = await self._identify_caller(caller_token)
        sid = _parse_uuid(session_id)
        # Looked up whatever the token: the time taken must not tell live from dead.
        owner = None if sid is None else await self._store.live_session_owner(sid)
        subject = token.live_subject
        if sid is not None and owner is not None and str(owner) == subject:
            revoked = await self._revoke_session(sid, "session_revoked", caller, "session")
            if revoked:
                return revoked
        raise await self._refused(
            token, caller, target="session_id", target_id=None if sid is None else str(sid)
        )

    async def revoke_subject(
        self, subject: str, *, caller_token: str | None, caller: CallerInfo
    ) -> int:
        """Log a subject out everywhere: every live session of theirs."""
        token = await self._identify_caller(caller_token)
        user_id = _parse_uuid(subject)
        if user_id is not None and subject == token.live_subject:
            reason = "logout_everywhere"
            now = self._clock.now()
            revocation, count = await self._store.revoke_user_sessions(
                user_id,
                reason=reason,
                now=to_datetime(now),
                event=SecurityEvent(
                    kind="sessions_revoked",
                    subject=str(user_id),
                    peer=caller.peer,
                    detail=caller.detail(reason=reason),
                ),
            )
            # Remembered here at once even if it ended nothing live (the answer is then the
            # refusal below, as for any other outcome that ends no live session).
            if self.user_revoked_here(revocation, count, "subject"):
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
                await self._store.record_event(
                    SecurityEvent(
                        kind="revoke_refused",
                        subject=None if claims is None else claims.subject,
                        session_id=None if claims is None else _parse_uuid(claims.session_id),
                        peer=caller.peer,
                        detail=detail,
                        # Repeats by one address, with one token, at one target share a row.
                        aggregate_key=aggregate_key(
                            address,
                            target,
                            token.state,
                            target_id or "",
                            "" if claims is None else claims.session_id,
                        ),
                    ),
                    now=to_datetime(self._clock.now()),
                )
        return CallerUnauthenticated()

    async def revoke_session_of_anyone(
        self, session_id: uuid.UUID, *, reason: str, caller: CallerInfo
    ) -> int:
        """An operator's revocation (admin API): any session, no ownership check, and
        recorded even when the session had ended already."""
        return await self._revoke_session(session_id, reason, caller, "admin", always_record=True)

    async def _revoke_session(
        self,
        session_id: uuid.UUID,
        reason: str,
        caller: CallerInfo,
        target: RevocationTarget,
        *,
        always_record: bool = False,
    ) -> int:
        now = self._clock.now()
        revoked = await self._store.revoke_session(
            session_id,
            reason=reason,
            now=to_datetime(now),
            event=SecurityEvent(
                kind="session_revoked",
                session_id=session_id,
                peer=caller.peer,
                detail=caller.detail(reason=reason),
            ),
            record_if_unchanged=always_record,
        )
        return self._revoked_here(revoked, target)

    def user_revoked_here(
        self, revocation: UserRevocation, count: int, target: RevocationTarget
    ) -> int:
        """A revocation of every session of a user, made by this process (a logout
        everywhere, or an operator's change): refused here at once; `count` sessions."""
        self._revocations.add_users([revocation])
        if count:
            self._telemetry.sessions_revoked(target, count)
        return count

    def _revoked_here(self, revoked: list[Revocation], target: RevocationTarget) -> int:
        """This process sees its own revocations at once, not when the NOTIFY arrives."""
        self._revocations.add(revoked)
        if revoked:
            self._telemetry.sessions_revoked(target, len(revoked))
        return len(revoked)

    async def _identify_caller(self, caller_token: str | None) -> CallerToken:
        """What the caller's access token is: live, revoked, expired, invalid or none."""
        if not caller_token:
            return CallerToken("none")
        try:
            claims = await self._with_new_keys(lambda: self._signed(caller_token))
        except TokenRejected:
            return CallerToken("invalid")
        try:
            self._codec.check_lifetime(claims)
        except TokenRejected:
            return CallerToken("expired", claims)
        if self._revocations.is_revoked(claims.session_id):
            return CallerToken("revoked", claims)
        return CallerToken("live", claims)

    async def _with_new_keys(self, verify: Callable[[], AccessClaims]) -> AccessClaims:
        """`verify()`, tried again once if it named a key this process has not loaded yet
        and looking for new keys found it (see `validate_with_new_keys`)."""
        try:
            return verify()
        except TokenRejected as rejected:
            if not await self._found_new_key(rejected.unknown_kid):
                raise
        return verify()

    async def _found_new_key(self, unknown_kid: str | None) -> bool:
        """Whether a key this process had not loaded is loaded now (after one look)."""
        if unknown_kid is None or self._signing_keys is None:
            return False
        return await self._signing_keys.look_for(unknown_kid)

    # Keys

    @property
    def jwks_json(self) -> str:
        return self._codec.key_ring.jwks_json
