"""Users: create, change password, disable, list. Used by the CLI (and later the admin API)."""

from __future__ import annotations

import logging
import uuid

from service.clock import Clock, to_datetime
from service.domain.passwords import PasswordHasher
from service.domain.records import SecurityEvent, UserRecord
from service.domain.tokens import CallerInfo, TokenService
from service.errors import UserNotFound
from service.store.postgres import PostgresStore

log = logging.getLogger(__name__)


class UserDirectory:
    """The user accounts."""

    def __init__(
        self,
        *,
        store: PostgresStore,
        hasher: PasswordHasher,
        tokens: TokenService,
        clock: Clock,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._tokens = tokens
        self._clock = clock

    async def create(self, username: str, password: str, scopes: tuple[str, ...]) -> UserRecord:
        password_hash = await self._hasher.hash(password)
        now = to_datetime(self._clock.now())
        user = await self._store.create_user(
            user_id=uuid.uuid4(),
            username=username,
            password_hash=password_hash,
            scopes=tuple(dict.fromkeys(scopes)),
            now=now,
        )
        await self._store.record_event(
            SecurityEvent(kind="user_created", subject=str(user.id)), now=now
        )
        return user

    async def set_password(
        self, username: str, password: str, *, revoke_sessions: bool = True
    ) -> UserRecord:
        """Change a password; by default every existing session ends with it."""
        user = await self._require(username)
        password_hash = await self._hasher.hash(password)
        now = to_datetime(self._clock.now())
        await self._store.set_password_hash(user.id, password_hash, now=now)
        await self._store.record_event(
            SecurityEvent(kind="password_changed", subject=str(user.id)), now=now
        )
        if revoke_sessions:
            await self._tokens.revoke_all_sessions(
                user.id, reason="password_changed", caller=CallerInfo()
            )
        return user

    async def set_disabled(self, username: str, disabled: bool) -> int:
        """Disable (ending every session; returns how many) or enable a user."""
        user = await self._require(username)
        now = to_datetime(self._clock.now())
        await self._store.set_user_disabled(user.id, disabled, now=now)
        kind = "user_disabled" if disabled else "user_enabled"
        await self._store.record_event(SecurityEvent(kind=kind, subject=str(user.id)), now=now)
        if not disabled:
            return 0
        log.warning("security: user %s disabled; revoking their sessions", user.id)
        return await self._tokens.revoke_all_sessions(
            user.id, reason="user_disabled", caller=CallerInfo()
        )

    async def list(self) -> list[UserRecord]:
        return await self._store.list_users()

    async def _require(self, username: str) -> UserRecord:
        user = await self._store.find_user(username)
        if user is None:
            raise UserNotFound()
        return user
