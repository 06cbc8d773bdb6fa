"""Sessions (token families): started by a login, capped per user, revoked, listed."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta

from service.domain.records import NewSession, SecurityEvent, SessionRecord, ThrottleSettlement
from service.domain.revocation import (
    REMEMBER_PAST_BOUND_SECONDS,
    USER_BOUND_STEP_SECONDS,
    Revocation,
    UserRevocation,
)
from service.store.events import EventWriter
from service.store.revocations import revoke_session, revoke_user_sessions
from service.store.throttle import settlement_arguments

# Sessions a login revokes beyond the cap at most (more only for users who had more than
# the cap before it existed: their excess goes this many per login).
MAX_EVICTIONS_PER_LOGIN = 100

# A login's session in one round trip (autocommit: the function's statements are one
# transaction), by the function of migration 0012, which says why it is a function.
# The session, its first refresh token and the login event are written only if the user
# is still enabled and still has the password hash that was just verified: a disable or
# password change that commits during the (slow) hash check must not be outrun by the
# login it should stop. The row lock on the user makes a login that meets a disable,
# delete, password change or logout everywhere in flight wait for it and check the new
# row (and take the new generation), and makes that change wait for the login, whose
# session (of the old generation) it then revokes; it also serializes a user's logins,
# so the session cap counts each one: the evictions are read in a statement of their
# own, after the lock is held. $15 is the `exp` of the access token the login will sign:
# the user's bound is raised to $16 (a step past it) if below it. The session may be
# deleted once that token and the session (its expiry, its first refresh token's) are
# both past. $17 is the cap - 1 (the others kept besides the new one), $18 the most
# evicted, $19 how long past its bound an evicted session's log row is kept. $20-$23: the
# login's throttle settlement (`settle_login_success`'s arguments; NULL: none), applied
# last (migration 0015), in the same transaction, also if the user changed.
START_SESSION_SQL = """
SELECT generation, evicted_ids, evicted_at, evicted_bounds
  FROM start_session($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18, $19, $20, $21, $22, $23)
"""


class PostgresSessions(EventWriter):
    """The `sessions` table (and the first refresh token of each)."""

    async def create_session(
        self,
        session: NewSession,
        event: SecurityEvent,
        *,
        verified_hash: str,
        max_sessions: int,
        settlement: ThrottleSettlement | None = None,
    ) -> tuple[int, list[Revocation]] | None:
        """Start a token family in one statement: the session, its first token and the
        login event, and the user's oldest sessions beyond `max_sessions` revoked (appended
        to the revocation log, with an event each), and the login's throttle `settlement`
        applied (also if the user changed). The session's generation and the sessions
        revoked; None if the user was disabled or changed password since `verified_hash`
        was read."""
        settle: tuple[object, ...] = (
            (None,) * 4 if settlement is None else settlement_arguments(settlement)
        )
        async with self._connection() as conn:
            row = await conn.fetchrow(
                START_SESSION_SQL,
                session.id,
                session.user_id,
                list(session.scopes),
                session.audience,
                session.created_at,
                session.expires_at,
                session.peer,
                session.user_agent,
                session.first_token_hash,
                session.first_token_expires_at,
                event.kind,
                event.subject,
                json.dumps(event.detail or {}),
                verified_hash,
                session.access_expires_at,
                session.access_expires_at + timedelta(seconds=USER_BOUND_STEP_SECONDS),
                max_sessions - 1,
                MAX_EVICTIONS_PER_LOGIN,
                float(REMEMBER_PAST_BOUND_SECONDS),
                *settle,
            )
        assert row is not None
        if row["generation"] is None:
            return None
        evicted = [
            Revocation(str(session_id), at.timestamp(), bound.timestamp())
            for session_id, at, bound in zip(
                row["evicted_ids"] or [],
                row["evicted_at"] or [],
                row["evicted_bounds"] or [],
                strict=True,
            )
        ]
        return row["generation"], evicted

    async def live_session_owner(self, session_id: uuid.UUID) -> uuid.UUID | None:
        """The user of a session not revoked yet; None for a revoked or unknown one."""
        async with self._connection() as conn:
            owner: uuid.UUID | None = await conn.fetchval(
                "SELECT user_id FROM sessions WHERE id = $1 AND revoked_at IS NULL", session_id
            )
        return owner

    async def session_of_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        async with self._connection() as conn:
            session_id: uuid.UUID | None = await conn.fetchval(
                "SELECT session_id FROM refresh_tokens WHERE token_hash = $1", token_hash
            )
        return session_id

    async def revoke_session(
        self,
        session_id: uuid.UUID,
        *,
        reason: str,
        now: datetime,
        event: SecurityEvent,
        record_if_unchanged: bool = False,
    ) -> list[Revocation]:
        """Revoke one session: [it] if this call revoked it, else []. The event names
        the session's user; it is recorded only if the call revoked the session, unless
        `record_if_unchanged` (an operator's call is recorded whatever it changed)."""
        async with self._transaction() as conn:
            revoked = await revoke_session(conn, session_id, reason, now)
            if revoked or record_if_unchanged:
                owner = await conn.fetchval(
                    "SELECT user_id FROM sessions WHERE id = $1", session_id
                )
                detail = {**(event.detail or {}), **({} if revoked else {"unchanged": "true"})}
                await self._insert_event(
                    conn,
                    replace(
                        event,
                        subject=event.subject or (None if owner is None else str(owner)),
                        detail=detail,
                    ),
                    now,
                )
        return revoked

    async def revoke_user_sessions(
        self, user_id: uuid.UUID, *, reason: str, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int]:
        """Revoke every session of a user: the revocation and how many live sessions it
        revoked (counted up to REVOKED_COUNT_LIMIT)."""
        async with self._transaction() as conn:
            revoked = await revoke_user_sessions(conn, user_id, reason, now)
            await self._insert_event(conn, event, now)
        return revoked

    async def live_sessions(
        self,
        user_id: uuid.UUID,
        *,
        now: datetime,
        limit: int,
        before: tuple[datetime, uuid.UUID] | None,
    ) -> list[SessionRecord]:
        """A user's sessions that can still be refreshed, newest first, `limit` of them,
        starting after the (created_at, id) cursor `before`."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT s.* FROM sessions s
                    WHERE s.user_id = $1 AND s.revoked_at IS NULL AND s.expires_at > $2
                      AND s.user_generation = (SELECT session_generation FROM users
                                                WHERE id = $1)
                      AND EXISTS (SELECT 1 FROM refresh_tokens t
                                   WHERE t.session_id = s.id AND t.used_at IS NULL
                                     AND t.expires_at > $2)
                      AND ($3::timestamptz IS NULL OR (s.created_at, s.id) < ($3, $4))
                    ORDER BY s.created_at DESC, s.id DESC
                    LIMIT $5""",
                user_id,
                now,
                None if before is None else before[0],
                None if before is None else before[1],
                limit,
            )
        return [
            SessionRecord(
                id=r["id"],
                user_id=r["user_id"],
                scopes=tuple(r["scopes"]),
                audience=r["audience"],
                created_at=r["created_at"],
                expires_at=r["expires_at"],
                last_refreshed_at=r["last_refreshed_at"],
                peer=r["peer"],
                user_agent=r["user_agent"],
            )
            for r in rows
        ]

    async def session_exists(self, session_id: uuid.UUID) -> bool:
        async with self._connection() as conn:
            found = await conn.fetchval("SELECT 1 FROM sessions WHERE id = $1", session_id)
        return found is not None
