"""Refresh tokens: the rotation of a presented token, under its row lock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg

from service.domain.records import RefreshTokenState, SecurityEvent
from service.domain.refresh_tokens import (
    RefreshDecision,
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
)
from service.domain.revocation import USER_BOUND_STEP_SECONDS, Revocation
from service.errors import SessionRevoked
from service.store.events import EventWriter
from service.store.revocations import revocations, revoke_session

# The refresh path's statements (also run bare by the benchmark's SQL baseline).
# The common case takes the lock and reads everything in one statement. A token
# found used needs a second statement: under READ COMMITTED a call that waited
# for the lock sees the parent's new version, but the joined rows (its child, its
# session) only as they were before the wait, so they are read again, fresh.
LOCK_REFRESH_TOKEN_SQL = """
SELECT rt.token_hash, rt.session_id, s.user_id, rt.issued_at, rt.expires_at, rt.used_at,
       rt.child_hash, s.scopes AS session_scopes, s.audience,
       s.expires_at AS session_expires_at,
       (s.revoked_at IS NOT NULL OR s.user_generation < u.session_generation)
           AS session_revoked,
       s.user_generation, u.access_expires_max AS user_access_expires_max,
       u.scopes AS user_scopes, u.disabled
  FROM refresh_tokens rt
  JOIN sessions s ON s.id = rt.session_id
  JOIN users u ON u.id = s.user_id
 WHERE rt.token_hash = $1
   FOR UPDATE OF rt
"""

ROTATED_TOKEN_STATE_SQL = """
SELECT c.expires_at AS child_expires_at, (c.used_at IS NOT NULL) AS child_used,
       (s.revoked_at IS NOT NULL OR s.user_generation < u.session_generation)
           AS session_revoked,
       u.disabled, s.last_refreshed_peer
  FROM sessions s
  JOIN users u ON u.id = s.user_id
  LEFT JOIN refresh_tokens c ON c.token_hash = $2
 WHERE s.id = $1
"""

# bound must cover its `exp`: if the lock query read a bound below it, $10 (a step past it)
# is written, under the user's row lock and only if the generation is still the session's
# (a revocation of the user that committed first announced the bound as it was, so nothing
# may be signed past it; one that comes later waits for the row and announces the raised
# bound). Otherwise ($10 NULL) the bound read already covers the token: bounds only grow,
# so even a revocation committing after that read remembers this token long enough, and
# the generation is checked again here, without a lock.
#
# Touch the session (who rotated it, to judge a replay of the parent) and raise its bound
# to the `exp` ($6) of the access token about to be signed, mark the parent used, store its
# only child: one round trip. All of it only if the session is not revoked: a revocation
# that committed while this waited for the session row announced the bound as it was, so
# no token may be signed past it. (A revocation that comes after this commit waits for the
# row, and announces the raised bound.) The same holds for the user's bound (above).
# The child ($5) is now the only unused token: the session lives until it or the session
# expires, and is kept until its last access token has expired too.
ROTATE_SQL = """
WITH user_raised AS (
    UPDATE users SET access_expires_max = greatest(access_expires_max, $10)
     WHERE $10::timestamptz IS NOT NULL AND id = $8 AND session_generation <= $9
    RETURNING 1),
user_current AS (
    SELECT 1 WHERE CASE WHEN $10::timestamptz IS NULL
                        THEN NOT EXISTS (SELECT 1 FROM users
                                          WHERE id = $8 AND session_generation > $9)
                        ELSE EXISTS (SELECT 1 FROM user_raised) END),
session AS (
    UPDATE sessions SET last_refreshed_at = $3, last_refreshed_peer = $7,
                        access_expires_max = greatest(access_expires_max, $6),
                        purge_after = greatest(access_expires_max, $6, least(expires_at, $5))
     WHERE id = $2 AND revoked_at IS NULL AND EXISTS (SELECT 1 FROM user_current)
    RETURNING id),
parent AS (
    UPDATE refresh_tokens SET used_at = $3, child_hash = $4
     WHERE token_hash = $1 AND used_at IS NULL AND EXISTS (SELECT 1 FROM session)
    RETURNING 1)
INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at)
SELECT $4, $2, $1, $3, $5 FROM parent
"""

# A replay within the grace window signs another access token: raise the bound to its
# `exp` ($2), unless the session or its user's generation was revoked meanwhile (as for
# ROTATE_SQL).
RAISE_ACCESS_EXPIRES_MAX_SQL = """
WITH user_raised AS (
    UPDATE users SET access_expires_max = greatest(access_expires_max, $5)
     WHERE $5::timestamptz IS NOT NULL AND id = $3 AND session_generation <= $4
    RETURNING 1),
user_current AS (
    SELECT 1 WHERE CASE WHEN $5::timestamptz IS NULL
                        THEN NOT EXISTS (SELECT 1 FROM users
                                          WHERE id = $3 AND session_generation > $4)
                        ELSE EXISTS (SELECT 1 FROM user_raised) END)
UPDATE sessions SET access_expires_max = greatest(access_expires_max, $2),
                    purge_after = CASE WHEN purge_after IS NOT NULL
                                       THEN greatest(purge_after, $2) END
 WHERE id = $1 AND revoked_at IS NULL AND EXISTS (SELECT 1 FROM user_current)
"""


def _refresh_state(row: asyncpg.Record, rotated: asyncpg.Record | None) -> RefreshTokenState:
    """The presented token's state; `rotated` is the fresh read made when it was used."""
    return RefreshTokenState(
        token_hash=bytes(row["token_hash"]),
        session_id=row["session_id"],
        user_id=row["user_id"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
        child_hash=None if row["child_hash"] is None else bytes(row["child_hash"]),
        child_expires_at=None if rotated is None else rotated["child_expires_at"],
        child_used=False if rotated is None else rotated["child_used"],
        session_scopes=tuple(row["session_scopes"]),
        session_audience=row["audience"],
        session_expires_at=row["session_expires_at"],
        session_revoked=(rotated or row)["session_revoked"],
        user_scopes=tuple(row["user_scopes"]),
        user_disabled=(rotated or row)["disabled"],
        rotated_by_peer=None if rotated is None else rotated["last_refreshed_peer"],
        session_generation=row["user_generation"],
    )


def _user_bound_raise(row: asyncpg.Record, access_expires_at: datetime) -> datetime | None:
    """What to raise the user's bound to before signing a token expiring at
    `access_expires_at` (a step past it), or None if the bound read covers it."""
    if row["user_access_expires_max"] >= access_expires_at:
        return None
    return access_expires_at + timedelta(seconds=USER_BOUND_STEP_SECONDS)


class PostgresRefreshTokens(EventWriter):
    """The `refresh_tokens` table, with the session and user rows a rotation touches."""

    async def refresh(
        self,
        token_hash: bytes,
        decide: Callable[[RefreshTokenState | None], RefreshDecision],
        *,
        now: datetime,
        access_expires_at: datetime,
        peer: str | None,
        event: Callable[[RefreshTokenState, RefreshDecision, bool], SecurityEvent | None],
    ) -> tuple[RefreshTokenState | None, RefreshDecision, list[Revocation], bool]:
        """Lock the presented token, let the domain `decide`, and apply the decision: the
        state, the decision applied, the revocation of the session if reuse was detected
        (also when it was revoked before, so this process is told at once), and whether
        the session was revoked by this call.

        The row lock serializes every call presenting the same token: the first
        rotates, the others see it used and replay the child or report reuse. A rotation
        or replay raises the session's bound to `access_expires_at`, the `exp` of the access
        token the caller will sign; if the session was revoked meanwhile, nothing is
        written and the decision becomes Reject(SessionRevoked). `event` says what to
        record of the decision (given whether this call revoked the session), if anything.
        """
        async with self._transaction() as conn:
            row = await conn.fetchrow(LOCK_REFRESH_TOKEN_SQL, token_hash)
            rotated = None
            if row is not None and row["used_at"] is not None:
                rotated = await conn.fetchrow(
                    ROTATED_TOKEN_STATE_SQL, row["session_id"], row["child_hash"]
                )
            state = None if row is None else _refresh_state(row, rotated)
            decision = decide(state)
            if state is None:
                return state, decision, [], False
            assert row is not None
            if isinstance(decision, Rotate):
                written = await conn.execute(
                    ROTATE_SQL,
                    token_hash,
                    state.session_id,
                    now,
                    decision.child_hash,
                    decision.child_expires_at,
                    access_expires_at,
                    peer,
                    state.user_id,
                    state.session_generation,
                    _user_bound_raise(row, access_expires_at),
                )
                if written != "INSERT 0 1":
                    return state, Reject(SessionRevoked), [], False
                return state, decision, [], False
            elif isinstance(decision, RevokeForReuse):
                revoked = await revoke_session(conn, state.session_id, "refresh_token_reused", now)
                newly_revoked = bool(revoked)
                if not revoked:  # revoked before: this process is told at once all the same
                    revoked = revocations(
                        await conn.fetch(
                            """SELECT id, revoked_at, access_expires_max FROM sessions
                                 WHERE id = $1 AND revoked_at IS NOT NULL""",
                            state.session_id,
                        )
                    )
                # Recorded even when the family was dead already: each replay is a theft signal.
                if recorded := event(state, decision, newly_revoked):
                    await self._insert_event(conn, recorded, now)
                return state, decision, revoked, newly_revoked
            elif isinstance(decision, Replay):
                # The child exists already; the new access token's exp is what to write.
                written = await conn.execute(
                    RAISE_ACCESS_EXPIRES_MAX_SQL,
                    state.session_id,
                    access_expires_at,
                    state.user_id,
                    state.session_generation,
                    _user_bound_raise(row, access_expires_at),
                )
                if written != "UPDATE 1":
                    return state, Reject(SessionRevoked), [], False
                # A replay of the child within the grace window is recorded too.
                if recorded := event(state, decision, False):
                    await self._insert_event(conn, recorded, now)
            return state, decision, [], False
