"""In-memory fakes of the domain's storage ports (`service.domain.ports`), and the domain
objects wired over them as `service.components` wires them over PostgreSQL: the token
lifecycle tested in milliseconds, without a database.

The fakes keep the rules the domain relies on (a session of a revoked generation is
revoked, a used token has one child, a revoked session is never written to, calls
presenting one refresh token take turns) and nothing else: the SQL's own behaviour is
what the live-server tests check.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from authsvc_client.token_check import VerifiedTokenCache

from service.clock import ManualClock, to_datetime
from service.domain.access_tokens import AccessTokenCodec
from service.domain.login import PasswordLogins
from service.domain.policy import TokenPolicy
from service.domain.records import (
    NewSession,
    RefreshTokenState,
    SecurityEvent,
    SessionRecord,
    SigningKeyRecord,
    ThrottleSettlement,
    UserRecord,
)
from service.domain.refresh_secret import load_refresh_secret
from service.domain.refresh_tokens import Rotate, decide_refresh
from service.domain.revocation import (
    USER_BOUND_STEP_SECONDS,
    Revocation,
    RevocationState,
    UserRevocation,
)
from service.domain.sessions import RevokeService, SessionRevocations
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import LoginOutcome, ReplayVerdict, RevocationTarget
from service.domain.tokens import TokenService
from service.domain.usernames import username_key
from service.domain.users import UserDirectory
from service.domain.validation import AccessTokenValidator
from service.errors import UserAlreadyExists
from service.secrets_box import SecretBox

EPOCH = to_datetime(0)


@dataclass
class FakeUser:
    record: UserRecord
    generation: int = 0
    access_expires_max: datetime = EPOCH
    deleted: bool = False


@dataclass
class FakeSession:
    id: uuid.UUID
    user_id: uuid.UUID
    scopes: tuple[str, ...]
    audience: str
    created_at: datetime
    expires_at: datetime
    access_expires_max: datetime
    user_generation: int
    peer: str | None
    user_agent: str | None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    last_refreshed_at: datetime | None = None
    last_refreshed_peer: str | None = None


@dataclass
class FakeToken:
    session_id: uuid.UUID
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    child_hash: bytes | None = None


@dataclass
class FakeStore:
    """Every storage port over dictionaries; `events` is the audit trail, in order."""

    users: dict[uuid.UUID, FakeUser] = field(default_factory=dict)
    sessions: dict[uuid.UUID, FakeSession] = field(default_factory=dict)
    tokens: dict[bytes, FakeToken] = field(default_factory=dict)
    events: list[SecurityEvent] = field(default_factory=list)
    keys: list[SigningKeyRecord] = field(default_factory=list)
    secrets: dict[str, bytes] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    refreshes: int = 0
    """Refresh transactions opened."""
    after_lock: Callable[[], None] | None = None
    """Run between a refresh's lock and its write: what commits meanwhile elsewhere."""
    _token_locks: dict[bytes, asyncio.Lock] = field(default_factory=dict)
    _bootstrap: asyncio.Lock = field(default_factory=asyncio.Lock)

    # Security events

    async def record_event(
        self, event: SecurityEvent, *, now: datetime, occurrences: int = 1
    ) -> None:
        self.events.extend([event] * occurrences)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    # Users

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
        if await self.find_user(username_key) is not None:
            raise UserAlreadyExists()
        record = UserRecord(user_id, username, password_hash, scopes, False, now)
        self.users[user_id] = FakeUser(record)
        return record

    async def find_user(self, key: str) -> UserRecord | None:
        for user in self.users.values():
            if not user.deleted and username_key(user.record.username) == key:
                return user.record
        return None

    async def find_user_by_id(self, user_id: uuid.UUID) -> UserRecord | None:
        user = self.users.get(user_id)
        return None if user is None or user.deleted else user.record

    async def list_users(self) -> list[UserRecord]:
        live = [u.record for u in self.users.values() if not u.deleted]
        return sorted(live, key=lambda r: r.username)

    async def set_password_hash(
        self, user_id: uuid.UUID, password_hash: str, *, now: datetime, replacing: str | None
    ) -> None:
        user = self.users[user_id]
        if replacing is None or user.record.password_hash == replacing:
            user.record = replace(user.record, password_hash=password_hash)

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
        user = self.users.get(user_id)
        if user is None or user.deleted:
            return None
        user.record = replace(
            user.record,
            password_hash=password_hash or user.record.password_hash,
            disabled=user.record.disabled if disabled is None else disabled,
        )
        revoked: tuple[UserRevocation | None, int] = (None, 0)
        if revoke_reason is not None:
            revoked = self._revoke_user(user, now)
        self.events.extend(events)
        return revoked

    async def delete_user(
        self, user_id: uuid.UUID, *, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int] | None:
        user = self.users.get(user_id)
        if user is None or user.deleted:
            return None
        user.deleted = True
        user.record = replace(user.record, disabled=True, password_hash="!", scopes=())
        revoked = self._revoke_user(user, now)
        self.events.append(event)
        return revoked

    # Sessions

    def revoked(self, session: FakeSession) -> bool:
        return (
            session.revoked_at is not None
            or session.user_generation < self.users[session.user_id].generation
        )

    async def create_session(
        self,
        session: NewSession,
        event: SecurityEvent,
        *,
        verified_hash: str,
        max_sessions: int,
        settlement: ThrottleSettlement | None = None,
    ) -> tuple[int, list[Revocation]] | None:
        user = self.users[session.user_id]
        if user.record.disabled or user.record.password_hash != verified_hash:
            return None
        if user.access_expires_max < session.access_expires_at:
            user.access_expires_max = session.access_expires_at + timedelta(
                seconds=USER_BOUND_STEP_SECONDS
            )
        self.sessions[session.id] = FakeSession(
            id=session.id,
            user_id=session.user_id,
            scopes=session.scopes,
            audience=session.audience,
            created_at=session.created_at,
            expires_at=session.expires_at,
            access_expires_max=session.access_expires_at,
            user_generation=user.generation,
            peer=session.peer,
            user_agent=session.user_agent,
        )
        self.tokens[session.first_token_hash] = FakeToken(
            session.id, session.created_at, session.first_token_expires_at
        )
        self.events.append(event)
        others = sorted(
            (
                s
                for s in self.sessions.values()
                if s.user_id == session.user_id
                and s.id != session.id
                and s.user_generation == user.generation
                and s.revoked_at is None
            ),
            key=lambda s: (s.created_at, s.id),
        )
        evicted = []
        for old in others[: max(0, len(others) - (max_sessions - 1))]:
            evicted += self._revoke(old, session.created_at, "session_limit")
            self.events.append(
                SecurityEvent(
                    kind="session_revoked",
                    subject=str(session.user_id),
                    session_id=old.id,
                    peer=session.peer,
                    detail={"reason": "session_limit"},
                )
            )
        return user.generation, evicted

    async def session_of_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        token = self.tokens.get(token_hash)
        return None if token is None else token.session_id

    async def live_session_owner(self, session_id: uuid.UUID) -> uuid.UUID | None:
        session = self.sessions.get(session_id)
        return None if session is None or session.revoked_at is not None else session.user_id

    async def session_exists(self, session_id: uuid.UUID) -> bool:
        return session_id in self.sessions

    async def live_sessions(
        self,
        user_id: uuid.UUID,
        *,
        now: datetime,
        limit: int,
        before: tuple[datetime, uuid.UUID] | None,
    ) -> list[SessionRecord]:
        live = [
            s
            for s in self.sessions.values()
            if s.user_id == user_id
            and not self.revoked(s)
            and s.expires_at > now
            and (before is None or (s.created_at, s.id) < before)
        ]
        live.sort(key=lambda s: (s.created_at, s.id), reverse=True)
        return [
            SessionRecord(
                s.id,
                s.user_id,
                s.scopes,
                s.audience,
                s.created_at,
                s.expires_at,
                s.last_refreshed_at,
                s.peer,
                s.user_agent,
            )
            for s in live[:limit]
        ]

    async def revoke_session(
        self,
        session_id: uuid.UUID,
        *,
        reason: str,
        now: datetime,
        event: SecurityEvent,
        record_if_unchanged: bool = False,
    ) -> list[Revocation]:
        session = self.sessions.get(session_id)
        revoked = [] if session is None else self._revoke(session, now, reason)
        if revoked or record_if_unchanged:
            subject = event.subject or (None if session is None else str(session.user_id))
            detail = {**(event.detail or {}), **({} if revoked else {"unchanged": "true"})}
            self.events.append(replace(event, subject=subject, detail=detail))
        return revoked

    async def revoke_user_sessions(
        self, user_id: uuid.UUID, *, reason: str, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int]:
        revoked = self._revoke_user(self.users[user_id], now)
        self.events.append(event)
        return revoked

    def _revoke(self, session: FakeSession, now: datetime, reason: str) -> list[Revocation]:
        if self.revoked(session):
            return []
        session.revoked_at, session.revoke_reason = now, reason
        return [_revocation(session)]

    def _revoke_user(self, user: FakeUser, now: datetime) -> tuple[UserRevocation, int]:
        live = [
            s
            for s in self.sessions.values()
            if s.user_id == user.record.id
            and s.user_generation == user.generation
            and s.revoked_at is None
        ]
        user.generation += 1
        revocation = UserRevocation(
            str(user.record.id),
            user.generation,
            now.timestamp(),
            user.access_expires_max.timestamp(),
        )
        return revocation, len(live)

    # Refresh tokens

    @asynccontextmanager
    async def refreshing(self) -> AsyncIterator[FakeRefresh]:
        self.refreshes += 1
        transaction = FakeRefresh(self)
        try:
            yield transaction
        finally:
            transaction.release()

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
        """The store's one-statement rotation: the lock, `decide_refresh` (the rule the
        statement's conditions follow), and `rotate` when it says so."""
        async with self.refreshing() as transaction:
            state = await transaction.lock(token_hash)
            decision = decide_refresh(
                state,
                now=now,
                grace=timedelta(0),  # a used token never rotates: the window is not asked
                idle_ttl=idle_expires_at - now,
                child_hash=child_hash,
                audiences=audiences,
            )
            if state is None or not isinstance(decision, Rotate):
                return state, False
            bound = state.user_access_expires_max
            rotated = await transaction.rotate(
                state,
                decision,
                now=now,
                access_expires_at=access_expires_at,
                peer=peer,
                user_bound=None if bound is not None and bound >= access_expires_at else user_bound,
            )
            return state, rotated

    def token_lock(self, token_hash: bytes) -> asyncio.Lock:
        return self._token_locks.setdefault(token_hash, asyncio.Lock())

    # Signing keys and secrets

    @asynccontextmanager
    async def bootstrap_lock(self) -> AsyncIterator[None]:
        async with self._bootstrap:
            yield

    async def signing_keys(self) -> list[SigningKeyRecord]:
        return sorted(self.keys, key=lambda k: (k.created_at, k.kid))

    async def signing_key_versions(self) -> list[tuple[str, bool]]:
        return sorted((k.kid, k.retired_at is not None) for k in self.keys)

    async def insert_signing_key(self, key: SigningKeyRecord, event: SecurityEvent) -> None:
        self.keys.append(key)
        self.events.append(event)

    async def retire_signing_keys(
        self, kids: list[str], *, now: datetime, event: SecurityEvent
    ) -> list[str]:
        retired = []
        for index, key in enumerate(self.keys):
            if key.kid in kids and key.retired_at is None:
                self.keys[index] = replace(key, retired_at=now, private_key_sealed=None)
                retired.append(key.kid)
        if retired:
            self.events.append(event)
        return sorted(retired)

    async def server_secret(self, name: str) -> bytes | None:
        return self.secrets.get(name)

    async def insert_server_secret(self, name: str, sealed: bytes, *, now: datetime) -> None:
        self.secrets[name] = sealed

    # Shared settings

    async def shared_settings(self) -> dict[str, Any]:
        return dict(self.shared)

    async def update_shared_settings(
        self,
        decide: Callable[[Mapping[str, Any]], tuple[dict[str, Any], SecurityEvent | None]],
        *,
        now: datetime,
    ) -> None:
        values, event = decide(dict(self.shared))
        self.shared.update(values)
        if event is not None:
            self.events.append(event)


def _revocation(session: FakeSession) -> Revocation:
    assert session.revoked_at is not None
    return Revocation(
        str(session.id), session.revoked_at.timestamp(), session.access_expires_max.timestamp()
    )


class FakeRefresh:
    """One refresh's transaction: the presented token's lock held until it ends."""

    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self._held: asyncio.Lock | None = None

    def release(self) -> None:
        if self._held is not None:
            self._held.release()

    async def lock(self, token_hash: bytes) -> RefreshTokenState | None:
        self._held = self._store.token_lock(token_hash)
        await self._held.acquire()
        token = self._store.tokens.get(token_hash)
        if token is None:
            return None
        session = self._store.sessions[token.session_id]
        user = self._store.users[session.user_id]
        child = None if token.child_hash is None else self._store.tokens.get(token.child_hash)
        used = token.used_at is not None
        return RefreshTokenState(
            token_hash=token_hash,
            session_id=session.id,
            user_id=session.user_id,
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            used_at=token.used_at,
            child_hash=token.child_hash,
            child_expires_at=None if child is None else child.expires_at,
            child_used=child is not None and child.used_at is not None,
            session_scopes=session.scopes,
            session_audience=session.audience,
            session_expires_at=session.expires_at,
            session_revoked=self._store.revoked(session),
            user_scopes=user.record.scopes,
            user_disabled=user.record.disabled,
            rotated_by_peer=session.last_refreshed_peer if used else None,
            session_generation=session.user_generation,
            user_access_expires_max=user.access_expires_max,
        )

    def _writable(self, state: RefreshTokenState, user_bound: datetime | None) -> bool:
        if self._store.after_lock is not None:
            self._store.after_lock()
        session = self._store.sessions[state.session_id]
        if self._store.revoked(session):
            return False
        user = self._store.users[state.user_id]
        if user_bound is not None:
            user.access_expires_max = max(user.access_expires_max, user_bound)
        return True

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
        parent = self._store.tokens[state.token_hash]
        if not self._writable(state, user_bound) or parent.used_at is not None:
            return False
        session = self._store.sessions[state.session_id]
        session.last_refreshed_at, session.last_refreshed_peer = now, peer
        session.access_expires_max = max(session.access_expires_max, access_expires_at)
        parent.used_at, parent.child_hash = now, rotation.child_hash
        self._store.tokens[rotation.child_hash] = FakeToken(
            state.session_id, now, rotation.child_expires_at
        )
        return True

    async def raise_bounds(
        self, state: RefreshTokenState, *, access_expires_at: datetime, user_bound: datetime | None
    ) -> bool:
        if not self._writable(state, user_bound):
            return False
        session = self._store.sessions[state.session_id]
        session.access_expires_max = max(session.access_expires_max, access_expires_at)
        return True

    async def revoke_for_reuse(
        self, state: RefreshTokenState, *, now: datetime
    ) -> tuple[list[Revocation], bool]:
        session = self._store.sessions[state.session_id]
        revoked = self._store._revoke(session, now, "refresh_token_reused")
        if revoked:
            return revoked, True
        return ([_revocation(session)] if session.revoked_at is not None else []), False

    async def record_event(self, event: SecurityEvent, *, now: datetime) -> None:
        self._store.events.append(event)


class PlainHasher:
    """A password "hash" that is the password (the domain's logic, not argon2's cost)."""

    threads = 1

    async def hash(self, password: str) -> str:
        return "plain$" + password

    async def verify(self, password_hash: str | None, password: str) -> bool:
        return password_hash == "plain$" + password

    def needs_rehash(self, password_hash: str) -> bool:
        return not password_hash.startswith("plain$")


@dataclass
class CountingTelemetry:
    """Every count the domain reports, by name."""

    counts: dict[str, int] = field(default_factory=dict)

    def _add(self, name: str, count: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + count

    def login(self, outcome: LoginOutcome) -> None:
        self._add(f"login_{outcome}")

    def refresh_reuse_detected(self) -> None:
        self._add("reuse_detected")

    def refresh_replayed(self, verdict: ReplayVerdict) -> None:
        self._add(f"replayed_{verdict}")

    def sessions_revoked(self, target: RevocationTarget, count: int) -> None:
        self._add(f"revoked_{target}", count)

    def signing_key_rotated(self) -> None:
        self._add("key_rotated")

    def janitor_deleted(self, table: str, count: int) -> None:
        self._add(f"deleted_{table}", count)

    def janitor_failed(self, table: str) -> None:
        self._add(f"failed_{table}")


POLICY = TokenPolicy(
    access_ttl=300,
    refresh_idle_ttl=3600,
    refresh_absolute_ttl=86400,
    refresh_reuse_grace=10,
    audience="api",
    audiences=frozenset({"other-api"}),
    max_sessions_per_user=3,
)


@dataclass
class Domain:
    """The domain objects of one process, over a FakeStore, on a manual clock."""

    store: FakeStore
    clock: ManualClock
    telemetry: CountingTelemetry
    state: RevocationState
    keys: SigningKeys
    tokens: TokenService
    validator: AccessTokenValidator
    revoke: RevokeService
    users: UserDirectory


KEK = secrets.token_bytes(32)


async def domain(
    policy: TokenPolicy = POLICY, *, store: FakeStore | None = None, start: float = 1.9e9
) -> Domain:
    """Build it as `build_components` does (key material created on first use); another
    one over the same `store` is another replica."""
    store = store or FakeStore()
    clock = ManualClock(start=start)
    telemetry = CountingTelemetry()
    state = RevocationState()
    box = SecretBox(KEK)
    keys = SigningKeys(
        store=store,
        box=box,
        clock=clock,
        alg="EdDSA",
        access_ttl=policy.access_ttl,
        leeway=0,
        telemetry=telemetry,
    )
    await keys.load()
    codec = AccessTokenCodec(issuer="https://auth.test", keys=keys, clock=clock, leeway=0)
    hasher = PlainHasher()
    revocations = SessionRevocations(sessions=store, state=state, clock=clock, telemetry=telemetry)
    validator = AccessTokenValidator(
        codec=codec, cache=VerifiedTokenCache(100), revocations=state, signing_keys=keys
    )
    logins = PasswordLogins(
        users=store, events=store, hasher=hasher, clock=clock, telemetry=telemetry
    )
    tokens = TokenService(
        policy=policy,
        sessions=store,
        refresh_tokens=store,
        logins=logins,
        revocations=revocations,
        codec=codec,
        refresh_secret=await load_refresh_secret(store, box, clock=clock),
        clock=clock,
        telemetry=telemetry,
    )
    revoke = RevokeService(
        sessions=store, events=store, revocations=revocations, validator=validator, clock=clock
    )
    users = UserDirectory(store=store, hasher=hasher, revocations=revocations, clock=clock)
    return Domain(store, clock, telemetry, state, keys, tokens, validator, revoke, users)
