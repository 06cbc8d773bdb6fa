"""Users and their sessions, as operators manage them: the CLI (`authsvc users ...`) and
the admin API share this code, so both check and record the same things."""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from service.clock import Clock, to_datetime
from service.domain.events import aggregate_key, peer_address
from service.domain.passwords import PasswordHashing
from service.domain.ports import SecurityEventStorage, SessionStorage, UserStorage
from service.domain.records import CallerInfo, SecurityEvent, SessionRecord, UserRecord
from service.domain.sessions import SessionRevocations
from service.domain.usernames import new_username_problem, username_key
from service.errors import FieldViolation, InvalidArgument, SessionNotFound, UserNotFound

log = logging.getLogger(__name__)

# A user is named by id (uuid.UUID) or by username (str, compared by its canonical key).
UserRef = uuid.UUID | str

CLI = CallerInfo(actor="cli")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[SessionRecord]
    next_page_token: str
    """Empty on the last page."""


class DirectoryStorage(UserStorage, SessionStorage, SecurityEventStorage, Protocol):
    """What the user directory reads and writes."""


class UserDirectory:
    """The user accounts."""

    def __init__(
        self,
        *,
        store: DirectoryStorage,
        hasher: PasswordHashing,
        revocations: SessionRevocations,
        clock: Clock,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._revocations = revocations
        self._clock = clock

    async def create(
        self,
        username: str,
        password: str,
        scopes: tuple[str, ...],
        *,
        caller: CallerInfo = CLI,
    ) -> UserRecord:
        """A new user, named as given; UserAlreadyExists if a user's name has the same
        canonical key (`alice` and `Alice` are one name), InvalidArgument for a name that
        `new_username_problem` refuses."""
        problem = new_username_problem(username)
        if problem is not None:
            raise InvalidArgument([FieldViolation("username", problem)])
        password_hash = await self._hasher.hash(password)
        now = to_datetime(self._clock.now())
        user = await self._store.create_user(
            user_id=uuid.uuid4(),
            username=username,
            username_key=username_key(username),
            password_hash=password_hash,
            scopes=tuple(dict.fromkeys(scopes)),
            now=now,
        )
        await self._record("user_created", user.id, caller, now)
        return user

    async def set_password(
        self,
        user: UserRef,
        password: str,
        *,
        revoke_sessions: bool = True,
        caller: CallerInfo = CLI,
    ) -> int:
        """Change a password; by default every existing session ends with it (how many)."""
        record = await self.find(user)
        password_hash = await self._hasher.hash(password)
        return await self._change(
            record,
            caller,
            "password_changed",
            password_hash=password_hash,
            revoke_reason="password_changed" if revoke_sessions else None,
        )

    async def set_disabled(self, user: UserRef, disabled: bool, *, caller: CallerInfo = CLI) -> int:
        """Disable (ending every session; returns how many) or enable a user."""
        record = await self.find(user)
        revoked = await self._change(
            record,
            caller,
            "user_disabled" if disabled else "user_enabled",
            disabled=disabled,
            revoke_reason="user_disabled" if disabled else None,
        )
        if disabled:
            log.warning("security: user %s disabled; %d sessions revoked", record.id, revoked)
        return revoked

    async def _change(
        self,
        record: UserRecord,
        caller: CallerInfo,
        kind: str,
        *,
        password_hash: str | None = None,
        disabled: bool | None = None,
        revoke_reason: str | None,
    ) -> int:
        """The change, its event and (with `revoke_reason`) the end of every session, all in
        one transaction; how many sessions ended."""
        subject = str(record.id)
        events = [
            SecurityEvent(kind=kind, subject=subject, peer=caller.peer, detail=caller.detail())
        ]
        if revoke_reason is not None:
            events.append(
                SecurityEvent(
                    kind="sessions_revoked",
                    subject=subject,
                    peer=caller.peer,
                    detail=caller.detail(reason=revoke_reason),
                )
            )
        revoked = await self._store.change_user(
            record.id,
            now=to_datetime(self._clock.now()),
            password_hash=password_hash,
            disabled=disabled,
            revoke_reason=revoke_reason,
            events=events,
        )
        if revoked is None:  # deleted meanwhile
            raise UserNotFound()
        revocation, count = revoked
        if revocation is None:
            return 0
        return self._revocations.remember_user(revocation, count, "admin")

    async def delete(self, user: UserRef, *, caller: CallerInfo = CLI) -> int:
        """Delete a user: sessions revoked, username free; how many sessions ended."""
        record = await self.find(user)
        revoked = await self._store.delete_user(
            record.id,
            now=to_datetime(self._clock.now()),
            event=SecurityEvent(
                kind="user_deleted",
                subject=str(record.id),
                peer=caller.peer,
                detail=caller.detail(),
            ),
        )
        if revoked is None:  # deleted by someone else meanwhile
            raise UserNotFound()
        revocation, count = revoked
        log.warning("security: user %s deleted; %d sessions revoked", record.id, count)
        return self._revocations.remember_user(revocation, count, "admin")

    async def list(self) -> list[UserRecord]:
        return await self._store.list_users()

    async def sessions(
        self, user: UserRef, *, page_size: int, page_token: str, caller: CallerInfo
    ) -> SessionPage:
        """A page of the user's live sessions, newest first."""
        record = await self.find(user)
        now = self._clock.now()
        sessions = await self._store.live_sessions(
            record.id,
            now=to_datetime(now),
            limit=page_size + 1,
            before=_parse_page_token(page_token),
        )
        await self._record("sessions_listed", record.id, caller, to_datetime(now))
        if len(sessions) <= page_size:
            return SessionPage(sessions=sessions, next_page_token="")
        last = sessions[page_size - 1]
        return SessionPage(
            sessions=sessions[:page_size], next_page_token=_page_token(last.created_at, last.id)
        )

    async def revoke_session(self, session_id: str, *, caller: CallerInfo) -> int:
        """End any session (1), or 0 if it had ended already; SessionNotFound if unknown."""
        try:
            sid = uuid.UUID(session_id)
        except ValueError:
            raise InvalidArgument([FieldViolation("session_id", "must be a UUID")]) from None
        if not await self._store.session_exists(sid):
            raise SessionNotFound()
        # Any session, no ownership check, recorded even when it had ended already.
        return await self._revocations.revoke_session(
            sid, reason="revoked_by_operator", caller=caller, target="admin", record_unchanged=True
        )

    async def audit(self, kind: str, *, caller: CallerInfo, **detail: str) -> None:
        """Record an operator's call that changed nothing (a read, a refusal)."""
        await self._store.record_event(
            SecurityEvent(kind=kind, peer=caller.peer, detail=caller.detail(**detail)),
            now=to_datetime(self._clock.now()),
        )

    async def record_refusal(
        self, *, method: str, reason: str, caller: CallerInfo, occurrences: int = 1
    ) -> None:
        """Record refused admin calls (`occurrences` of them): one row per actor, method,
        reason and address and window, counted, so that a flood of refusals, which
        costs its sender next to nothing, cannot grow the table at will."""
        await self._store.record_event(
            SecurityEvent(
                kind="admin_call_refused",
                peer=caller.peer,
                detail=caller.detail(method=method, reason=reason),
                aggregate_key=aggregate_key(
                    caller.actor, method, reason, peer_address(caller.peer)
                ),
            ),
            now=to_datetime(self._clock.now()),
            occurrences=occurrences,
        )

    async def find(self, user: UserRef) -> UserRecord:
        if isinstance(user, uuid.UUID):
            record = await self._store.find_user_by_id(user)
        else:
            record = await self._store.find_user(username_key(user))
        if record is None:
            raise UserNotFound()
        return record

    async def _record(
        self, kind: str, user_id: uuid.UUID, caller: CallerInfo, now: datetime
    ) -> None:
        await self._store.record_event(
            SecurityEvent(
                kind=kind, subject=str(user_id), peer=caller.peer, detail=caller.detail()
            ),
            now=now,
        )


def _page_token(created_at: datetime, session_id: uuid.UUID) -> str:
    # Whole microseconds (PostgreSQL's precision): a float would not round-trip.
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    raw = f"{micros}/{session_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_page_token(token: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        micros, _, sid = raw.partition("/")
        return _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(sid)
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError):
        raise InvalidArgument([FieldViolation("page_token", "not a token from this API")]) from None
