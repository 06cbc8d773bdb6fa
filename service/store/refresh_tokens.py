"""Refresh tokens: one refresh is one transaction (`PostgresRefreshTokens.refreshing`),
the presented token's row locked from the first statement to the commit; the domain
decides between the statements (`service.domain.tokens`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg

from service.clock import Clock, SystemClock
from service.domain.records import RefreshTokenState, SecurityEvent
from service.domain.refresh_tokens import Rotate
from service.domain.revocation import Revocation
from service.store.base import StoreBase
from service.store.events import insert_event
from service.store.fresh_rotations import FreshRotation, FreshRotationBatches
from service.store.revocations import revocations, revoke_session, stepped_purge_after

# The refresh path's statements (also run bare by the benchmark's SQL baseline).
# The common case takes the lock and reads everything in one statement. A token
# found used needs a second statement: under READ COMMITTED a call that waited
# for the lock sees the parent's new version, but the joined rows (its child, its
# session) only as they were before the wait, so they are read again, fresh.

# The presented tokens' rows, locked, read with their sessions and users: the first
# statement of the transaction path (with one token), and the `presented` part of
# ROTATE_FRESH_TOKEN_SQL (one text for both, so that the two paths read the same state).
# $1 is an array: a batch of fresh rotations locks all its tokens here, in token-hash order
# (the lock is taken row by row as the sorted rows come out), so that two statements
# locking overlapping tokens cannot each hold one the other waits for.
LOCK_REFRESH_TOKEN_SQL = """SELECT rt.token_hash, rt.session_id, s.user_id, rt.issued_at,
       rt.expires_at, rt.used_at, rt.child_hash, rt.rotation, s.scopes AS session_scopes,
       s.audience,
       s.expires_at AS session_expires_at,
       (s.revoked_at IS NOT NULL OR s.user_generation < u.session_generation)
           AS session_revoked,
       s.user_generation, u.access_expires_max AS user_access_expires_max,
       u.scopes AS user_scopes, u.disabled
  FROM refresh_tokens rt
  JOIN sessions s ON s.id = rt.session_id
  JOIN users u ON u.id = s.user_id
 WHERE rt.token_hash = ANY($1::bytea[])
 ORDER BY rt.token_hash
   FOR UPDATE OF rt"""

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

# The session's purge time after a rotation: the later of its bound and the moment its child
# ($5 here, the fresh path's child_expires_at) expires, kept as stored within a step of that
# (revocations.stepped_purge_after: most refreshes then change no indexed column of sessions),
# and never past the later of its bound and its absolute expiry.
_ROTATE_PURGE_AFTER = stepped_purge_after(
    "greatest(access_expires_max, $6, least(expires_at, $5))",
    "greatest(access_expires_max, $6, expires_at)",
)
_ROTATE_FRESH_PURGE_AFTER = stepped_purge_after(
    "greatest(s.access_expires_max, f.access_expires_at, f.child_expires_at)",
    "greatest(s.access_expires_max, f.access_expires_at, s.expires_at)",
)

# A session keeps its REFRESH_TOKENS_KEPT newest refresh tokens at most, and STEP more
# between prunings (migration 0017): a rotation whose child is the session's
# (multiple of STEP)th deletes the tokens more than KEPT places behind the child, in the
# same statement. A client rotating in a loop then holds at most KEPT + STEP rows, not one
# a refresh; a replay of a token older than that is an unknown token (refused, nothing
# revoked). KEPT is about ten days of a client refreshing every 15 minutes (the default
# AUTH_ACCESS_TTL); reuse of any token within it revokes the session.
REFRESH_TOKENS_KEPT = 1000
REFRESH_TOKEN_PRUNE_STEP = 100

# ROTATE_SQL, the rotation of the path of several statements. The user's bound must cover
# the access token's `exp`: if the lock query read a bound below it, $10 (a step past it)
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
# expires, and is kept until its last access token has expired too. Every STEP-th child
# prunes the session's oldest tokens (REFRESH_TOKENS_KEPT, above).
ROTATE_SQL = f"""
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
                        purge_after = {_ROTATE_PURGE_AFTER}
     WHERE id = $2 AND revoked_at IS NULL AND EXISTS (SELECT 1 FROM user_current)
    RETURNING id),
parent AS (
    UPDATE refresh_tokens SET used_at = $3, child_hash = $4
     WHERE token_hash = $1 AND used_at IS NULL AND EXISTS (SELECT 1 FROM session)
    RETURNING rotation + 1 AS child_rotation),
pruned AS (
    DELETE FROM refresh_tokens old USING parent p
     WHERE p.child_rotation % {REFRESH_TOKEN_PRUNE_STEP} = 0
       AND old.session_id = $2 AND old.rotation <= p.child_rotation - {REFRESH_TOKENS_KEPT})
INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at,
                            rotation)
SELECT $4, $2, $1, $3, $5, child_rotation FROM parent
"""  # noqa: S608 (constants only)

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


# Refreshes in the common case, in one statement and one round trip (autocommit), for one
# token or a batch of them (`service.store.fresh_rotations` sends the refreshes that arrive
# while others are in flight together: a statement's fixed costs, paid once). Per item
# (the arrays $1..$4 and $6..$8, an item's ordinal its index there; the audiences $5 are
# the batch's): the presented token locked and read with its session and user (the
# columns of LOCK_REFRESH_TOKEN_SQL), and, only if `decide_refresh` would rotate it
# (unused, the session live, its user enabled, its audience still issued, neither expired:
# `fresh`), ROTATE_SQL's writes: the user's bound raised when the one read is below the
# access token's `exp` ($6) (to $7, under the user's row lock and only if the generation is
# still the session's), the session touched and its bound raised (only if not revoked
# meanwhile: the row lock re-checks it), the parent marked used and its one child ($3)
# stored (every STEP-th child of a session prunes its oldest tokens, as in ROTATE_SQL).
# Each item's row is returned with its `ordinal` and `rotated`; anything else (a
# used token, a refusal, a write refused by a revocation that committed meanwhile) writes
# nothing for that item, and the domain decides on the row or takes the path of several
# statements. One snapshot serves the whole statement: a call that waited here for the
# token's lock finds it used (its rotation committed), so it rotates nothing; the
# revocation of the session or (when the bound is raised) of the user that commits while
# it waits for their rows stops it, as in ROTATE_SQL. Unknown token: no row for it.
#
# The items of a batch are independent: distinct tokens (the sender's rule: the same
# token twice would be rotated twice), so distinct sessions for the fresh ones (a session
# has one unused token), but possibly one user for several. Such a user's row is updated
# once, to the greatest bound its items need, if the generation is still that of one of
# them; each item's session is written only if its own check holds on the row written
# (its generation, a bound covering its token). Users are locked in id order (as tokens
# are), so that two batches raising the bounds of the same users cannot deadlock.
ROTATE_FRESH_TOKEN_SQL = f"""
WITH presented AS (
{LOCK_REFRESH_TOKEN_SQL}),
item AS (
    SELECT * FROM unnest($1::bytea[], $2::timestamptz[], $3::bytea[], $4::timestamptz[],
                         $6::timestamptz[], $7::timestamptz[], $8::text[])
           WITH ORDINALITY AS i(token_hash, refreshed_at, child_hash, idle_expires_at,
                                access_expires_at, user_bound, peer, ordinal)),
fresh AS (
    SELECT p.token_hash, p.session_id, p.user_id, p.user_generation, i.refreshed_at,
           i.child_hash, i.access_expires_at, i.user_bound, i.peer,
           least(i.idle_expires_at, p.session_expires_at) AS child_expires_at,
           p.rotation + 1 AS child_rotation,
           coalesce(p.user_access_expires_max >= i.access_expires_at, false) AS bound_covers
      FROM presented p
      JOIN item i ON i.token_hash = p.token_hash
     WHERE p.used_at IS NULL AND NOT p.session_revoked AND NOT p.disabled
       AND p.audience = ANY($5::text[])
       AND i.refreshed_at < p.expires_at AND i.refreshed_at < p.session_expires_at),
user_locked AS (
    SELECT u.id FROM users u
     WHERE u.id IN (SELECT user_id FROM fresh WHERE NOT bound_covers)
     ORDER BY u.id
       FOR UPDATE),
user_raised AS (
    UPDATE users u SET access_expires_max = greatest(u.access_expires_max, r.user_bound)
      FROM (SELECT f.user_id, max(f.user_bound) AS user_bound,
                   max(f.user_generation) AS user_generation
              FROM fresh f JOIN user_locked l ON l.id = f.user_id
             WHERE NOT f.bound_covers
             GROUP BY f.user_id) r
     WHERE u.id = r.user_id AND u.session_generation <= r.user_generation
    RETURNING u.id, u.session_generation, u.access_expires_max),
session AS (
    UPDATE sessions s SET last_refreshed_at = f.refreshed_at, last_refreshed_peer = f.peer,
                          access_expires_max = greatest(s.access_expires_max,
                                                        f.access_expires_at),
                          purge_after = {_ROTATE_FRESH_PURGE_AFTER}
      FROM fresh f
     WHERE s.id = f.session_id AND s.revoked_at IS NULL
       AND (f.bound_covers
            OR EXISTS (SELECT 1 FROM user_raised r
                        WHERE r.id = f.user_id AND r.session_generation <= f.user_generation
                          AND r.access_expires_max >= f.access_expires_at))
    RETURNING s.id),
parent AS (
    UPDATE refresh_tokens rt SET used_at = f.refreshed_at, child_hash = f.child_hash
      FROM fresh f
     WHERE rt.token_hash = f.token_hash AND rt.used_at IS NULL
       AND EXISTS (SELECT 1 FROM session s WHERE s.id = f.session_id)
    RETURNING rt.token_hash),
child AS (
    INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at,
                                rotation)
    SELECT f.child_hash, f.session_id, f.token_hash, f.refreshed_at, f.child_expires_at,
           f.child_rotation
      FROM fresh f JOIN parent p ON p.token_hash = f.token_hash
    RETURNING parent_hash),
pruned AS (
    DELETE FROM refresh_tokens old
     USING fresh f JOIN parent p ON p.token_hash = f.token_hash
     WHERE f.child_rotation % {REFRESH_TOKEN_PRUNE_STEP} = 0
       AND old.session_id = f.session_id
       AND old.rotation <= f.child_rotation - {REFRESH_TOKENS_KEPT})
SELECT p.*, i.ordinal,
       EXISTS (SELECT 1 FROM child c WHERE c.parent_hash = p.token_hash) AS rotated
  FROM presented p
  JOIN item i ON i.token_hash = p.token_hash
"""  # noqa: S608 (constants only)


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
        user_access_expires_max=row["user_access_expires_max"],
    )


class PostgresRefresh:
    """One refresh's transaction (the `RefreshTransaction` port)."""

    def __init__(self, conn: asyncpg.Connection, *, event_window: float) -> None:
        self._conn = conn
        self._event_window = event_window

    async def lock(self, token_hash: bytes) -> RefreshTokenState | None:
        """The presented token's state, its row locked until the end of the transaction:
        every call presenting the same token waits here for the one before it."""
        row = await self._conn.fetchrow(LOCK_REFRESH_TOKEN_SQL, [token_hash])
        if row is None:
            return None
        rotated = None
        if row["used_at"] is not None:
            rotated = await self._conn.fetchrow(
                ROTATED_TOKEN_STATE_SQL, row["session_id"], row["child_hash"]
            )
        return _refresh_state(row, rotated)

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
        """Mark the token used, store its child, raise the bounds (ROTATE_SQL); False,
        writing nothing, if the session or its user's generation was revoked meanwhile."""
        written = await self._conn.execute(
            ROTATE_SQL,
            state.token_hash,
            state.session_id,
            now,
            rotation.child_hash,
            rotation.child_expires_at,
            access_expires_at,
            peer,
            state.user_id,
            state.session_generation,
            user_bound,
        )
        return bool(written == "INSERT 0 1")

    async def raise_bounds(
        self, state: RefreshTokenState, *, access_expires_at: datetime, user_bound: datetime | None
    ) -> bool:
        """Raise the session's bound (and the user's, to `user_bound`) to cover a token
        expiring at `access_expires_at`; False if the session was revoked meanwhile."""
        written = await self._conn.execute(
            RAISE_ACCESS_EXPIRES_MAX_SQL,
            state.session_id,
            access_expires_at,
            state.user_id,
            state.session_generation,
            user_bound,
        )
        return bool(written == "UPDATE 1")

    async def revoke_for_reuse(
        self, state: RefreshTokenState, *, now: datetime
    ) -> tuple[list[Revocation], bool]:
        """Revoke the token's session: its revocation (also when it was revoked before,
        so that this process is told at once) and whether this call revoked it."""
        revoked = await revoke_session(self._conn, state.session_id, "refresh_token_reused", now)
        if revoked:
            return revoked, True
        return await self._revocation_of(state.session_id), False

    async def _revocation_of(self, session_id: uuid.UUID) -> list[Revocation]:
        return revocations(
            await self._conn.fetch(
                """SELECT id, revoked_at, access_expires_max FROM sessions
                                 WHERE id = $1 AND revoked_at IS NOT NULL""",
                session_id,
            )
        )

    async def record_event(self, event: SecurityEvent, *, now: datetime) -> None:
        await insert_event(self._conn, event, now, window=self._event_window)


class PostgresRefreshTokens(StoreBase):
    """The `refresh_tokens` table, with the session and user rows a rotation touches."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout: float,
        event_window: float = 300,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: what tells how long a batch of fresh rotations has been in flight (the
        service's; this host's when not given)."""
        super().__init__(pool, timeout=timeout, event_window=event_window)
        self._fresh_rotations = FreshRotationBatches(
            self._rotate_fresh, clock=clock or SystemClock()
        )

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
        """ROTATE_FRESH_TOKEN_SQL: one statement, outside any transaction block, shared
        with the calls that arrive while others are in flight (`FreshRotationBatches`)."""
        row = await self._fresh_rotations.rotate(
            FreshRotation(
                token_hash=token_hash,
                now=now,
                child_hash=child_hash,
                idle_expires_at=idle_expires_at,
                audiences=audiences,
                access_expires_at=access_expires_at,
                user_bound=user_bound,
                peer=peer,
            )
        )
        if row is None:
            return None, False
        return _refresh_state(row, None), bool(row["rotated"])

    async def _rotate_fresh(self, batch: Sequence[FreshRotation]) -> list[asyncpg.Record | None]:
        """One batch (distinct tokens, one set of audiences) in one statement: each item's
        row, in order (None: unknown token)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                ROTATE_FRESH_TOKEN_SQL,
                [item.token_hash for item in batch],
                [item.now for item in batch],
                [item.child_hash for item in batch],
                [item.idle_expires_at for item in batch],
                sorted(batch[0].audiences),
                [item.access_expires_at for item in batch],
                [item.user_bound for item in batch],
                [item.peer for item in batch],
            )
        answers: list[asyncpg.Record | None] = [None] * len(batch)
        for row in rows:
            answers[row["ordinal"] - 1] = row
        return answers

    @asynccontextmanager
    async def refreshing(self) -> AsyncIterator[PostgresRefresh]:
        """One refresh, in one transaction (committed on leaving, unless it raised)."""
        async with self._transaction() as conn:
            yield PostgresRefresh(conn, event_window=self._event_window)
