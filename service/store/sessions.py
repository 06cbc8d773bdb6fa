"""Sessions (token families): started by a login, capped per user, revoked, listed."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import datetime, timedelta

from service.domain.records import NewSession, SecurityEvent, SessionRecord
from service.domain.revocation import USER_BOUND_STEP_SECONDS, Revocation, UserRevocation
from service.store.events import EventWriter
from service.store.revocations import (
    log_revoked,
    purge_after_on_revoke,
    revocations,
    revoke_session,
    revoke_user_sessions,
)

# Sessions a login revokes beyond the cap at most (more only for users who had more than
# the cap before it existed: their excess goes this many per login).
MAX_EVICTIONS_PER_LOGIN = 100

# A login: the session, its first refresh token and the security event, written
# only if the user is still enabled and still has the password hash that was just
# verified: a disable or password change that commits during the (slow) hash check
# must not be outrun by the login it should stop. The row lock on the user makes a login
# that meets a disable, delete, password change or logout everywhere in flight wait for
# it and check the new row (and take the new generation), and makes that change wait for
# the login, whose session (of the old generation) it then revokes; it also serializes a
# user's logins, so the session cap counts each one. $15 is the `exp` of the access token
# the login will sign: the user's bound is raised to $16 (a step past it) if below it.
# The session may be deleted once that token and the session (its expiry, its first
# refresh token's) are both past.
CREATE_SESSION_SQL = """
WITH still_valid AS (
    UPDATE users SET access_expires_max = CASE WHEN access_expires_max >= $15
                                               THEN access_expires_max ELSE $16 END
     WHERE id = $2 AND NOT disabled AND password_hash = $14
    RETURNING session_generation),
session AS (
    INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at, peer, user_agent,
                          access_expires_max, user_generation, purge_after)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $15, session_generation,
           greatest($15::timestamptz, least($6::timestamptz, $10::timestamptz))
      FROM still_valid
    RETURNING id, user_generation),
token AS (
    INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
    SELECT $9, id, $5, $10 FROM session),
event AS (
    INSERT INTO security_events
           (occurred_at, last_occurred_at, kind, subject, session_id, peer, detail)
    SELECT $5, $5, $11, $12, id, $7, $13 FROM session)
SELECT user_generation FROM session
"""

# The session cap, right after a login's insert ($3), in its transaction (the user's row is
# locked): the oldest of the user's unrevoked sessions of the current generation beyond the
# newest $4 (the cap - 1, besides the new one) are revoked, $5 at most. Both reads are
# bounded ranges of sessions_user_live, whatever the number of sessions.
EVICT_OLDEST_SESSIONS_SQL = f"""
WITH excess AS (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM sessions
         WHERE user_id = $1 AND user_generation = $2 AND revoked_at IS NULL AND id <> $3
         ORDER BY created_at DESC, id DESC
        OFFSET $4 LIMIT $5) beyond),
oldest AS (
    SELECT id FROM sessions
     WHERE user_id = $1 AND user_generation = $2 AND revoked_at IS NULL AND id <> $3
     ORDER BY created_at, id
     LIMIT (SELECT n FROM excess))
UPDATE sessions s SET revoked_at = $6, revoke_reason = 'session_limit',
                      purge_after = {purge_after_on_revoke("$6")}
  FROM oldest WHERE s.id = oldest.id AND s.revoked_at IS NULL
RETURNING s.id, s.revoked_at, s.access_expires_max
"""  # noqa: S608 (constants only)


class PostgresSessions(EventWriter):
    """The `sessions` table (and the first refresh token of each)."""

    async def create_session(
        self,
        session: NewSession,
        event: SecurityEvent,
        *,
        verified_hash: str,
        max_sessions: int,
    ) -> tuple[int, list[Revocation]] | None:
        """Start a token family: the session, its first token and the login event in one
        statement, and, in the same transaction, the user's oldest sessions beyond
        `max_sessions` revoked (appended to the revocation log, with an event each). The session's
        generation and the sessions revoked; None if the user was disabled or changed
        password since `verified_hash` was read."""
        async with self._transaction() as conn:
            generation: int | None = await conn.fetchval(
                CREATE_SESSION_SQL,
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
            )
            if generation is None:
                return None
            evicted = revocations(
                await conn.fetch(
                    EVICT_OLDEST_SESSIONS_SQL,
                    session.user_id,
                    generation,
                    session.id,
                    max_sessions - 1,
                    MAX_EVICTIONS_PER_LOGIN,
                    session.created_at,
                )
            )
            if evicted:
                await log_revoked(conn, evicted)
                for revocation in evicted:
                    await self._insert_event(
                        conn,
                        SecurityEvent(
                            kind="session_revoked",
                            subject=str(session.user_id),
                            session_id=uuid.UUID(revocation.session_id),
                            peer=session.peer,
                            detail={"reason": "session_limit"},
                        ),
                        session.created_at,
                    )
        return generation, evicted

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
