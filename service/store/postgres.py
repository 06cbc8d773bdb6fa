"""PostgreSQL store: every SQL statement of the service lives in this module.

The store takes a pool; it never creates one behind your back. Errors are
mapped by asyncpg exception class (SQLSTATE), never by message text: lost or
refused connections, timeouts and writes refused by a read-only server (a standby)
become `DatabaseUnavailable`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from service.clock import ClockReading
from service.domain.records import (
    NewSession,
    RefreshTokenState,
    SecurityEvent,
    SessionRecord,
    SigningKeyRecord,
    ThrottleState,
    UserRecord,
)
from service.domain.refresh_tokens import (
    RefreshDecision,
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
)
from service.domain.revocation import USER_BOUND_STEP_SECONDS, Revocation, UserRevocation
from service.errors import DatabaseUnavailable, SessionRevoked, UserAlreadyExists
from service.settings import MAX_SESSIONS_PER_USER
from service.store.notifications import (
    CHANNEL,
    KEYS_CHANNEL,
    USERS_CHANNEL,
    notify_payloads,
    user_notify_payload,
)

# Connection trouble, by class: SQLSTATE 08 (connection), 57 (operator
# intervention: shutdown, cancel, cannot connect now), 53 (out of resources),
# client-side interface and protocol-state errors (closed connection or pool),
# OS-level socket errors and timeouts.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    # asyncpg's protocol can end in an inconsistent state when the server shuts down
    # mid-call ("cannot switch to state ..."); the connection is gone either way.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # lock_timeout (SQLSTATE 55P03): another replica held a lock for too long.
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

_CLOCK_SQL = "SELECT extract(epoch FROM pg_catalog.clock_timestamp())::float8"

# Serializes key and secret creation between replicas starting together.
_BOOTSTRAP_LOCK_ID = 0x61757468  # "auth"
# Held by the one replica whose janitor is running.
_JANITOR_LOCK_ID = 0x6A616E69  # "jani"
# Held by the one replica catching up on users' revocations (a janitor step of its own).
_CATCH_UP_LOCK_ID = 0x63617463  # "catc"

# What a revocation of all a user's sessions reports as revoked is counted up to this many
# (the largest AUTH_MAX_SESSIONS_PER_USER): the count reads a bounded range of the index.
REVOKED_COUNT_LIMIT = MAX_SESSIONS_PER_USER
# Sessions a login revokes beyond the cap at most (more only for users who had more than
# the cap before it existed: their excess goes this many per login).
MAX_EVICTIONS_PER_LOGIN = 100

# When a session may be deleted, computed from its rows: the later of its access-token
# bound and the moment it died (the earliest of its absolute expiry, its revocation and
# the expiry of its unused refresh token; with no unused token, it is dead already).
# Stored as `sessions.purge_after` by every write that changes one of these (the cheap
# forms are in CREATE_SESSION_SQL, ROTATE_SQL, RAISE_ACCESS_EXPIRES_MAX_SQL and
# PURGE_AFTER_ON_REVOKE); the janitor's re-check and back-fill use this exact form.
SESSION_PURGE_AFTER = """greatest(s.access_expires_max, least(s.expires_at, s.revoked_at,
    coalesce((SELECT max(t.expires_at) FROM refresh_tokens t
               WHERE t.session_id = s.id AND t.used_at IS NULL), '-infinity'::timestamptz)))"""


def purge_after_on_revoke(at: str) -> str:
    """The new `purge_after` of a session revoked at `at` (a statement parameter): it dies
    then, if it had not died before: greatest(aem, least(died, at)) =
    least(greatest(aem, died), greatest(aem, at)). NULL (not computed yet) stays NULL for
    the janitor's back-fill."""
    return f"""CASE WHEN purge_after IS NOT NULL
    THEN least(purge_after, greatest(access_expires_max, {at})) END"""


PURGE_AFTER_ON_REVOKE = purge_after_on_revoke("$2")

# Revoking (at $2, reason $3) one session ($1). A session its user's generation revoked
# already is not revoked again (the janitor writes its revoked_at).
REVOKE_SESSION_SQL = f"""
UPDATE sessions SET revoked_at = $2, revoke_reason = $3, purge_after = {PURGE_AFTER_ON_REVOKE}
 WHERE id = $1 AND revoked_at IS NULL
   AND user_generation >= (SELECT session_generation FROM users WHERE users.id = sessions.user_id)
RETURNING id, revoked_at, access_expires_max"""  # noqa: S608 (constants only)

# A throttle row's "forget after", the expression of the index login_throttle_forget_after
# (migration 0008): the row makes no one wait once its failures are past the window, its
# lock has ended and no attempt is pending (or the pending one is abandoned).
_THROTTLE_FORGET_AFTER = """greatest(
    CASE WHEN failures = 0 THEN '-infinity'::timestamptz ELSE last_failure_at END,
    coalesce(locked_until, '-infinity'::timestamptz),
    CASE WHEN pending = 0 THEN '-infinity'::timestamptz
         ELSE coalesce(pending_at, 'infinity'::timestamptz) END)"""

# Clean-up. Each statement is one batch (its own short transaction): it finds at most $2
# candidates through an index, so it costs the same whatever the table's size; it returns
# how many rows it examined (fewer than $2: the table is done for this cutoff), deleted
# and repaired, and the cursor to resume after (tables walked in key order).
_PURGE_SQL = {
    # Sessions nobody can use any more and whose every access token has expired (their
    # stored bound, whatever the access TTL is now), both before the cutoff; their tokens
    # go with them (ON DELETE CASCADE). Each candidate is checked against its rows: one
    # whose stored purge_after was wrong is not deleted but given the right one.
    "sessions": f"""
        WITH candidate AS (
            SELECT s.id, {SESSION_PURGE_AFTER} AS purge_after
              FROM sessions s
             WHERE s.purge_after < $1
             ORDER BY s.purge_after
             LIMIT $2
               FOR UPDATE SKIP LOCKED),
        gone AS (
            DELETE FROM sessions s USING candidate c
             WHERE s.id = c.id AND c.purge_after < $1 RETURNING 1),
        repaired AS (
            UPDATE sessions s SET purge_after = c.purge_after FROM candidate c
             WHERE s.id = c.id AND c.purge_after >= $1 RETURNING 1)
        SELECT (SELECT count(*) FROM candidate) AS examined,
               (SELECT count(*) FROM gone) AS deleted,
               (SELECT count(*) FROM repaired) AS repaired""",  # noqa: S608 (constants only)
    # Retired keys are kept as long as the security events that may name their kid.
    "signing_keys": """
        WITH gone AS (
            DELETE FROM signing_keys WHERE kid = ANY(ARRAY(
                SELECT kid FROM signing_keys WHERE retired_at < $1 LIMIT $2))
            RETURNING 1)
        SELECT count(*) AS examined, count(*) AS deleted, 0::bigint AS repaired FROM gone""",
    # Deleted users, once the janitor has deleted their last session. Those whose sessions
    # remain are walked past, in (deleted_at, id) order from the cursor ($3, $4).
    "users": """
        WITH candidate AS (
            SELECT u.id, u.deleted_at FROM users u
             WHERE u.deleted_at < $1
               AND (u.deleted_at, u.id) > ($3, $4)
             ORDER BY u.deleted_at, u.id
             LIMIT $2),
        gone AS (
            DELETE FROM users u USING candidate c
             WHERE u.id = c.id
               AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = c.id)
            RETURNING 1),
        last AS (SELECT deleted_at, id FROM candidate ORDER BY deleted_at DESC, id DESC LIMIT 1)
        SELECT (SELECT count(*) FROM candidate) AS examined,
               (SELECT count(*) FROM gone) AS deleted, 0::bigint AS repaired,
               (SELECT deleted_at FROM last) AS after_time,
               (SELECT id::text FROM last) AS after_key""",
    # Through the occurred_at index: ORDER BY id would walk the whole primary key when
    # nothing is old.
    "security_events": """
        WITH gone AS (
            DELETE FROM security_events WHERE id = ANY(ARRAY(
                SELECT id FROM security_events WHERE occurred_at < $1
                 ORDER BY occurred_at LIMIT $2))
            RETURNING 1)
        SELECT count(*) AS examined, count(*) AS deleted, 0::bigint AS repaired FROM gone""",
    "login_throttle": f"""
        WITH gone AS (
            DELETE FROM login_throttle WHERE key = ANY(ARRAY(
                SELECT key FROM login_throttle
                 WHERE {_THROTTLE_FORGET_AFTER} < $1
                 ORDER BY {_THROTTLE_FORGET_AFTER}
                 LIMIT $2 FOR UPDATE SKIP LOCKED))
            RETURNING 1)
        SELECT count(*) AS examined, count(*) AS deleted, 0::bigint AS repaired FROM gone""",  # noqa: S608
}

# Sessions written before migration 0008 (or by an older replica) get their purge_after
# computed, $1 at a time, through sessions_purge_after (btree indexes NULLs). The ORDER BY
# (of NULLs) makes the plan the index's even while the statistics say every row is NULL: a
# scan from the table's start would pass over ever more filled rows, batch after batch.
BACKFILL_PURGE_AFTER_SQL = f"""
WITH candidate AS (
    SELECT s.id, {SESSION_PURGE_AFTER} AS purge_after
      FROM sessions s
     WHERE s.purge_after IS NULL
     ORDER BY s.purge_after
     LIMIT $1
       FOR UPDATE SKIP LOCKED),
filled AS (
    UPDATE sessions s SET purge_after = c.purge_after FROM candidate c
     WHERE s.id = c.id RETURNING 1)
SELECT (SELECT count(*) FROM candidate) AS examined, 0::bigint AS deleted,
       (SELECT count(*) FROM filled) AS repaired"""  # noqa: S608 (constants only)

# A login attempt's throttle keys: their rows, made if missing and locked in key order
# (the no-op update takes the row lock and returns the row as it is).
LOCK_THROTTLE_KEYS_SQL = """
INSERT INTO login_throttle AS t (key, failures, last_failure_at, pending)
SELECT k, 0, $2, 0 FROM unnest($1::text[]) AS k ORDER BY k
    ON CONFLICT (key) DO UPDATE SET pending = t.pending
RETURNING key, failures, last_failure_at, locked_until, pending, pending_at
"""

# Settling an attempt locks its keys' rows in key order too, for the same reason.
SETTLE_LOGIN_FAILURE_SQL = """
WITH locked AS (
    SELECT key FROM login_throttle WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE)
UPDATE login_throttle AS t
   SET pending = greatest(t.pending - 1, 0),
       locked_until = greatest(t.locked_until, v.until)
  FROM locked, unnest($1::text[], $2::timestamptz[]) AS v(key, until)
 WHERE t.key = locked.key AND v.key = t.key
"""

SETTLE_LOGIN_SUCCESS_SQL = """
WITH locked AS (
    SELECT key FROM login_throttle WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE)
UPDATE login_throttle AS t
   SET pending = greatest(t.pending - 1, 0),
       failures = CASE WHEN v.clear THEN 0 ELSE greatest(t.failures - 1, 0) END,
       locked_until = CASE WHEN v.clear THEN NULL ELSE t.locked_until END,
       last_failure_at = CASE WHEN t.last_failure_at = $4 THEN v.previous
                              ELSE t.last_failure_at END
  FROM locked, unnest($1::text[], $2::bool[], $3::timestamptz[]) AS v(key, clear, previous)
 WHERE t.key = locked.key AND v.key = t.key
"""

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

# A revocation of every session of a user: one row, whatever their number. The sessions of
# the generation it ends are counted (up to $4, through the index); the janitor writes
# their revoked_at later, in batches (`catch_up_user_revocations`).
REVOKE_USER_SESSIONS_SQL = """
UPDATE users SET session_generation = session_generation + 1,
                 sessions_revoked_at = $2, sessions_revoke_reason = $3,
                 revoked_sessions_until = access_expires_max,
                 sessions_revoke_pending = true
 WHERE id = $1
RETURNING session_generation, revoked_sessions_until,
          (SELECT count(*) FROM (
               SELECT 1 FROM sessions s
                WHERE s.user_id = $1 AND s.user_generation = users.session_generation - 1
                  AND s.revoked_at IS NULL
                LIMIT $4) c) AS sessions
"""

# The janitor's catch-up: one batch of a user's sessions of an ended generation, walked in
# index order from the cursor ($5, $6, $7), given the user's revocation time and reason.
CATCH_UP_BATCH_SQL = f"""
WITH batch AS (
    SELECT id, user_generation, created_at FROM sessions
     WHERE user_id = $1 AND user_generation < $2 AND revoked_at IS NULL
       AND (user_generation, created_at, id) > ($5, $6, $7)
     ORDER BY user_generation, created_at, id
     LIMIT $8),
done AS (
    UPDATE sessions s SET revoked_at = $3, revoke_reason = $4,
                          purge_after = {purge_after_on_revoke("$3")}
      FROM batch WHERE s.id = batch.id AND s.revoked_at IS NULL
    RETURNING 1),
last AS (
    SELECT user_generation, created_at, id FROM batch
     ORDER BY user_generation DESC, created_at DESC, id DESC LIMIT 1)
SELECT (SELECT count(*) FROM batch) AS examined, (SELECT count(*) FROM done) AS revoked,
       last.user_generation, last.created_at, last.id
  FROM (SELECT 1) one LEFT JOIN last ON true
"""  # noqa: S608 (constants only)

# A Refresh signs a token for a session of user $8 started under generation $9 (below). The user's
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _revocations(rows: list[asyncpg.Record]) -> list[Revocation]:
    return [
        Revocation(str(r["id"]), r["revoked_at"].timestamp(), r["access_expires_max"].timestamp())
        for r in rows
    ]


def _user(row: asyncpg.Record) -> UserRecord:
    return UserRecord(
        id=row["id"],
        username=row["username"],
        password_hash=row["password_hash"],
        scopes=tuple(row["scopes"]),
        disabled=row["disabled"],
        created_at=row["created_at"],
    )


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


@dataclass(frozen=True, slots=True)
class PurgeBatch:
    """What one clean-up batch did."""

    examined: int
    """Candidates found (fewer than the batch size: nothing more to do for now)."""
    deleted: int
    repaired: int = 0
    """Rows whose stored purge time was missing or wrong, now computed from their rows."""
    after: tuple[datetime, str] | None = None
    """Where to resume a walk in key order (users), or None."""


PURGE_TABLES = tuple(_PURGE_SQL)
"""What `Purger.purge_batch` can clean, in the janitor's order."""

# The cursor a walk in key order starts from.
_WALK_START = (datetime.min.replace(tzinfo=UTC), "00000000-0000-0000-0000-000000000000")


class Purger:
    """The janitor's connection while it holds the janitor lock: each call is one batch,
    one short transaction that waits for no row lock longer than `lock_timeout`."""

    def __init__(self, conn: asyncpg.Connection, *, lock_timeout: float) -> None:
        self._conn = conn
        self._lock_timeout = f"{max(1, int(lock_timeout * 1000))}ms"

    async def purge_batch(
        self,
        table: str,
        cutoff: datetime,
        *,
        batch: int,
        after: tuple[datetime, str] | None = None,
    ) -> PurgeBatch:
        """Delete at most `batch` rows of `table` that are forgettable before `cutoff`
        (see _PURGE_SQL); `after` resumes a walk where the previous batch ended."""
        args: tuple[object, ...] = (cutoff, batch)
        if table == "users":
            start = after or _WALK_START
            args = (cutoff, batch, start[0], uuid.UUID(start[1]))
        row = await self._run(_PURGE_SQL[table], *args)
        resume = None
        if table == "users":
            resume = (row["after_time"], row["after_key"]) if row["after_key"] else after
        return PurgeBatch(row["examined"], row["deleted"], row["repaired"], resume)

    async def backfill_purge_after(self, *, batch: int) -> PurgeBatch:
        """Compute purge_after for at most `batch` sessions that have none yet."""
        row = await self._run(BACKFILL_PURGE_AFTER_SQL, batch)
        return PurgeBatch(row["examined"], row["deleted"], row["repaired"])

    async def _run(self, sql: str, *args: object) -> asyncpg.Record:
        try:
            async with self._conn.transaction():
                await self._conn.execute(
                    "SELECT set_config('lock_timeout', $1, true)", self._lock_timeout
                )
                row: asyncpg.Record | None = await self._conn.fetchrow(sql, *args)
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc
        assert row is not None  # every purge statement returns one row of counts
        return row


class PostgresStore:
    """All persistence of authsvc."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float, event_window: float = 300) -> None:
        self._pool = pool
        self._timeout = timeout
        # Repeats of an aggregated event within one such window share a row.
        self._event_window = event_window

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    yield conn
                except asyncpg.ReadOnlySQLTransactionError as exc:
                    # A standby (or a server made read-only): no write will succeed on
                    # this session. Dropped, so that the pool connects again, which with
                    # target_session_attrs=read-write finds the primary.
                    conn.terminate()
                    raise DatabaseUnavailable() from exc
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable() from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    # Time

    async def clock_readings(
        self, count: int, *, monotonic: Callable[[], float], wall: Callable[[], float]
    ) -> list[ClockReading]:
        """`count` readings of the database's clock, one after another on one connection
        (the first pays for the statement's preparation; its round trip shows it)."""
        readings = []
        async with self._connection() as conn:
            for _ in range(count):
                wall_before, sent = wall(), monotonic()
                # clock_timestamp(), not now(): now() is the transaction's start.
                database = await conn.fetchval(_CLOCK_SQL, timeout=self._timeout)
                received, wall_after = monotonic(), wall()
                readings.append(
                    ClockReading(
                        sent=sent,
                        received=received,
                        database=float(database),
                        wall=(wall_before + wall_after) / 2,
                    )
                )
        return readings

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
        """A new user; UserAlreadyExists if a live user has the same `username_key`."""
        try:
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    """INSERT INTO users (id, username, username_key, password_hash, scopes,
                                          created_at, updated_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING *""",
                    user_id,
                    username,
                    username_key,
                    password_hash,
                    list(scopes),
                    now,
                )
        except asyncpg.UniqueViolationError:
            raise UserAlreadyExists() from None
        assert row is not None
        return _user(row)

    async def find_user(self, username_key: str) -> UserRecord | None:
        """The live user whose username has this canonical key."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM users WHERE username_key = $1 AND deleted_at IS NULL", username_key
            )
        return None if row is None else _user(row)

    async def find_user_by_id(self, user_id: uuid.UUID) -> UserRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM users WHERE id = $1 AND deleted_at IS NULL", user_id
            )
        return None if row is None else _user(row)

    async def list_users(self) -> list[UserRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM users WHERE deleted_at IS NULL ORDER BY username"
            )
        return [_user(r) for r in rows]

    async def set_password_hash(
        self,
        user_id: uuid.UUID,
        password_hash: str,
        *,
        now: datetime,
        replacing: str | None = None,
    ) -> None:
        """Store a new hash; with `replacing`, only if the stored hash is still that one
        (a rehash must never undo a password change that happened meanwhile)."""
        async with self._connection() as conn:
            await conn.execute(
                """UPDATE users SET password_hash = $2, updated_at = $3
                    WHERE id = $1 AND deleted_at IS NULL
                      AND ($4::text IS NULL OR password_hash = $4)""",
                user_id,
                password_hash,
                now,
                replacing,
            )

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
        """One transaction: set a new password hash and/or the disabled flag, revoke every
        session if `revoke_reason` is given (with the NOTIFY), and record the events.
        All of it or none: a change cut short can never leave the old sessions alive.
        The user's revocation (None without `revoke_reason`) and how many sessions it
        revoked, or None if there is no such user."""
        async with self._transaction() as conn:
            found = await conn.fetchval(
                """UPDATE users SET password_hash = coalesce($2, password_hash),
                                    disabled = coalesce($3, disabled), updated_at = $4
                    WHERE id = $1 AND deleted_at IS NULL RETURNING id""",
                user_id,
                password_hash,
                disabled,
                now,
            )
            if found is None:
                return None
            revoked: tuple[UserRevocation | None, int] = (
                (None, 0)
                if revoke_reason is None
                else await self._revoke_user_sessions(conn, user_id, revoke_reason, now)
            )
            for event in events:
                await self._insert_event(conn, event, now)
        return revoked

    async def delete_user(
        self, user_id: uuid.UUID, *, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int] | None:
        """Mark a user deleted (disabled, no password, username free) and revoke their
        sessions, in one transaction; the revocation and how many sessions it revoked, or
        None if there was no such user.
        The janitor deletes the row once their sessions are gone."""
        async with self._transaction() as conn:
            found = await conn.fetchval(
                """UPDATE users SET deleted_at = $2, disabled = true, password_hash = '!',
                                    scopes = '{}', updated_at = $2
                    WHERE id = $1 AND deleted_at IS NULL RETURNING id""",
                user_id,
                now,
            )
            if found is None:
                return None
            revoked = await self._revoke_user_sessions(conn, user_id, "user_deleted", now)
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

    # Signing keys and server secrets

    @asynccontextmanager
    async def bootstrap_lock(self) -> AsyncIterator[None]:
        """Held while a replica creates or rotates keys or the first secret, so only one
        does at a time (it holds one pooled connection; the work inside uses others)."""
        async with self._transaction() as conn:
            await self._take_bootstrap_lock(conn)
            yield

    async def _take_bootstrap_lock(self, conn: asyncpg.Connection) -> None:
        """The bootstrap lock, until `conn`'s transaction ends."""
        # Never wait forever behind another replica: give up as UNAVAILABLE instead, a
        # little before the statement timeout, so the server's clean error comes first.
        lock_timeout_ms = max(1, int(self._timeout * 900))
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{lock_timeout_ms}ms")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK_ID)

    # Settings every replica shares

    async def shared_settings(self) -> dict[str, Any]:
        """The recorded shared settings, name -> value (empty before the first serve)."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT name, value FROM shared_settings")
        return {r["name"]: json.loads(r["value"]) for r in rows}

    async def update_shared_settings(
        self,
        decide: Callable[[dict[str, Any]], tuple[dict[str, Any], SecurityEvent | None]],
        *,
        now: datetime,
    ) -> None:
        """Read the record, let `decide` say what to write (name -> value) and the event
        that says why, and write both: in one transaction under the bootstrap lock, so that
        replicas starting together (and `settings adopt`) take turns."""
        async with self._transaction() as conn:
            await self._take_bootstrap_lock(conn)
            rows = await conn.fetch("SELECT name, value FROM shared_settings")
            values, event = decide({r["name"]: json.loads(r["value"]) for r in rows})
            if values:
                await conn.executemany(
                    """INSERT INTO shared_settings (name, value, recorded_at)
                       VALUES ($1, $2::jsonb, $3)
                       ON CONFLICT (name)
                       DO UPDATE SET value = excluded.value, recorded_at = excluded.recorded_at""",
                    [(name, json.dumps(value), now) for name, value in values.items()],
                )
            if event is not None:
                await self._insert_event(conn, event, now)

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored key, retired ones included, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT * FROM signing_keys ORDER BY created_at, kid")
        return [
            SigningKeyRecord(
                kid=r["kid"],
                alg=r["alg"],
                public_jwk=json.loads(r["public_jwk"]),
                private_key_sealed=(
                    None if r["private_key_sealed"] is None else bytes(r["private_key_sealed"])
                ),
                created_at=r["created_at"],
                activates_at=r["activates_at"],
                retired_at=r["retired_at"],
            )
            for r in rows
        ]

    async def signing_key_versions(self) -> list[tuple[str, bool]]:
        """(kid, retired) of every key: what a replica compares to see whether to reload."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT kid, retired_at IS NOT NULL AS retired FROM signing_keys ORDER BY kid"
            )
        return [(r["kid"], r["retired"]) for r in rows]

    async def insert_signing_key(self, key: SigningKeyRecord, event: SecurityEvent) -> None:
        """Store a new key, record why, and tell every replica (on commit)."""
        async with self._transaction() as conn:
            await conn.execute(
                """INSERT INTO signing_keys
                          (kid, alg, public_jwk, private_key_sealed, created_at, activates_at)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                key.kid,
                key.alg,
                json.dumps(key.public_jwk),
                key.private_key_sealed,
                key.created_at,
                key.activates_at,
            )
            await self._insert_event(conn, event, key.created_at)
            await conn.execute("SELECT pg_notify($1, '')", KEYS_CHANNEL)

    async def retire_signing_keys(
        self, kids: list[str], *, now: datetime, event: SecurityEvent
    ) -> list[str]:
        """Retire keys (wiping their private halves); the kids this call retired."""
        async with self._transaction() as conn:
            rows = await conn.fetch(
                """UPDATE signing_keys SET retired_at = $2, private_key_sealed = NULL
                    WHERE kid = ANY($1::text[]) AND retired_at IS NULL RETURNING kid""",
                kids,
                now,
            )
            retired = sorted(r["kid"] for r in rows)
            if retired:
                await self._insert_event(
                    conn,
                    replace(event, detail={**(event.detail or {}), "kids": ",".join(retired)}),
                    now,
                )
                await conn.execute("SELECT pg_notify($1, '')", KEYS_CHANNEL)
        return retired

    async def server_secret(self, name: str) -> bytes | None:
        async with self._connection() as conn:
            value = await conn.fetchval("SELECT sealed FROM server_secrets WHERE name = $1", name)
        return None if value is None else bytes(value)

    async def insert_server_secret(self, name: str, sealed: bytes, *, now: datetime) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO server_secrets (name, sealed, created_at) VALUES ($1, $2, $3)",
                name,
                sealed,
                now,
            )

    # Sessions and refresh tokens

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
        `max_sessions` revoked (with the NOTIFY and an event each). The session's
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
            evicted = _revocations(
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
                await self._notify_revoked(conn, evicted)
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
                revoked = await self._revoke_session(
                    conn, state.session_id, "refresh_token_reused", now
                )
                newly_revoked = bool(revoked)
                if not revoked:  # revoked before: this process is told at once all the same
                    revoked = _revocations(
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
            revoked = await self._revoke_session(conn, session_id, reason, now)
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
            revoked = await self._revoke_user_sessions(conn, user_id, reason, now)
            await self._insert_event(conn, event, now)
        return revoked

    # A revocation returns what every replica needs to remember it, and for how long. An
    # UPDATE that waited for a Refresh holding the session row re-reads it, so RETURNING
    # gives the bound that Refresh raised: the revocation carries it.

    # A user's revocation is one row: the generation raised, with the user's bound as it is
    # now. A login or refresh holding the user's row (to raise that bound) commits first,
    # and its session is then of the generation revoked; see ROTATE_SQL.

    @staticmethod
    async def _revoke_user_sessions(
        conn: asyncpg.Connection, user_id: uuid.UUID, reason: str, now: datetime
    ) -> tuple[UserRevocation, int]:
        row = await conn.fetchrow(
            REVOKE_USER_SESSIONS_SQL, user_id, now, reason, REVOKED_COUNT_LIMIT
        )
        assert row is not None
        revocation = UserRevocation(
            str(user_id),
            row["session_generation"],
            now.timestamp(),
            row["revoked_sessions_until"].timestamp(),
        )
        await conn.execute(
            "SELECT pg_notify($1, $2)", USERS_CHANNEL, user_notify_payload(revocation)
        )
        return revocation, row["sessions"]

    @classmethod
    async def _revoke_session(
        cls, conn: asyncpg.Connection, session_id: uuid.UUID, reason: str, now: datetime
    ) -> list[Revocation]:
        # A session its user's generation revoked already is not revoked again (the
        # janitor writes its revoked_at).
        rows = await conn.fetch(
            REVOKE_SESSION_SQL,
            session_id,
            now,
            reason,
        )
        revoked = _revocations(rows)
        await cls._notify_revoked(conn, revoked)
        return revoked

    @staticmethod
    async def _notify_revoked(conn: asyncpg.Connection, revoked: list[Revocation]) -> None:
        """Tell every replica, on commit (NOTIFY is transactional)."""
        for payload in notify_payloads(revoked):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    # Login throttling

    async def reserve_login_attempt(
        self,
        keys: list[str],
        decide: Callable[[list[ThrottleState]], dict[str, tuple[int, int]] | None],
        *,
        now: datetime,
    ) -> None:
        """Lock the keys' rows (made if missing), let the domain `decide`, and write the
        (failures, pending) it returns for each key, stamped `now`; None writes nothing.

        The row lock makes check and count one step per key, on every replica; the rows
        are locked in key order, so two attempts sharing keys cannot deadlock.
        """
        async with self._transaction() as conn:
            rows = await conn.fetch(LOCK_THROTTLE_KEYS_SQL, sorted(set(keys)), now)
            counts = decide([ThrottleState(**dict(row)) for row in rows])
            if counts is None:
                return
            await conn.execute(
                """UPDATE login_throttle AS t
                      SET failures = v.failures, pending = v.pending,
                          last_failure_at = $4, pending_at = $4
                     FROM unnest($1::text[], $2::int[], $3::int[]) AS v(key, failures, pending)
                    WHERE t.key = v.key""",
                list(counts),
                [failures for failures, _ in counts.values()],
                [pending for _, pending in counts.values()],
                now,
            )

    async def settle_login_failure(self, until: dict[str, datetime | None]) -> None:
        """An attempt reserved against these keys failed: it stays counted, is no longer
        pending, and each key with a time waits until then (never shortening a wait)."""
        async with self._connection() as conn:
            await conn.execute(
                SETTLE_LOGIN_FAILURE_SQL,
                list(until),
                list(until.values()),
            )

    async def settle_login_success(
        self,
        previous_failure_at: dict[str, datetime],
        *,
        clear: set[str],
        reserved_at: datetime,
    ) -> None:
        """An attempt reserved at `reserved_at` succeeded: keys in `clear` forget their
        failures and waits; the others take back the failure the attempt was counted as
        (and, unless a later attempt came, the time of their previous failure)."""
        async with self._connection() as conn:
            await conn.execute(
                SETTLE_LOGIN_SUCCESS_SQL,
                list(previous_failure_at),
                [key in clear for key in previous_failure_at],
                list(previous_failure_at.values()),
                reserved_at,
            )

    # Clean-up

    @asynccontextmanager
    async def janitor_turn(self) -> AsyncIterator[Purger | None]:
        """The janitor's lock, held on one connection while inside (None: another
        replica's janitor is running). Each call of the Purger is one short transaction
        on that connection."""
        async with self._connection() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _JANITOR_LOCK_ID):
                yield None
                return
            try:
                # Waiting behind a row or table lock gains nothing: give up well before
                # the statement timeout, the next pass tries again.
                yield Purger(conn, lock_timeout=min(1.0, self._timeout * 0.9))
            finally:
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock($1)", _JANITOR_LOCK_ID)

    async def catch_up_user_revocations(self, *, batch: int, max_batches: int) -> int | None:
        """Write revoked_at and revoke_reason (the user's) into sessions that their user's
        revocation ended, `batch` sessions per statement (each its own transaction), at
        most `max_batches` statements; how many sessions were written. None if another
        replica is at it. What revokes those sessions is the user's generation; this only
        lets the admin views and the clean-up catch up."""
        async with self._connection() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _CATCH_UP_LOCK_ID):
                return None
            try:
                users = await conn.fetch(
                    """SELECT id, session_generation, sessions_revoked_at, sessions_revoke_reason
                         FROM users WHERE sessions_revoke_pending LIMIT $1""",
                    max_batches,
                )
                written = batches = 0
                for user in users:
                    # Walked in index order; the cursor starts before every session.
                    after: tuple[int, datetime, uuid.UUID] = (-1, _EPOCH, uuid.UUID(int=0))
                    while batches < max_batches:
                        row = await conn.fetchrow(
                            CATCH_UP_BATCH_SQL,
                            user["id"],
                            user["session_generation"],
                            user["sessions_revoked_at"],
                            user["sessions_revoke_reason"],
                            *after,
                            batch,
                        )
                        assert row is not None
                        batches += 1
                        written += row["revoked"]
                        if row["examined"] < batch:
                            # Unless a newer revocation came meanwhile: its turn is next.
                            await conn.execute(
                                """UPDATE users SET sessions_revoke_pending = false
                                    WHERE id = $1 AND session_generation = $2""",
                                user["id"],
                                user["session_generation"],
                            )
                            break
                        after = (row["user_generation"], row["created_at"], row["id"])
                return written
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _CATCH_UP_LOCK_ID)

    # Security events

    async def record_event(
        self, event: SecurityEvent, *, now: datetime, occurrences: int = 1
    ) -> None:
        """Record `event` (`occurrences` times over, for an aggregated one)."""
        async with self._connection() as conn:
            await self._insert_event(conn, event, now, occurrences)

    async def events(self, *, since: datetime) -> list[dict[str, Any]]:
        """Events that last happened at or after `since`, oldest row first: time (the
        first), kind, subject, session, peer, detail, occurrences and last time."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT occurred_at, kind, subject, session_id, peer, detail, occurrences,
                          coalesce(last_occurred_at, occurred_at) AS last_occurred_at
                     FROM security_events
                    -- An aggregated row spans less than one window: the index narrows.
                    WHERE occurred_at >= $1::timestamptz - make_interval(secs => $2::float8)
                      AND coalesce(last_occurred_at, occurred_at) >= $1
                    ORDER BY id""",
                since,
                float(self._event_window),
            )
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    async def _insert_event(
        self, conn: asyncpg.Connection, event: SecurityEvent, now: datetime, occurrences: int = 1
    ) -> None:
        if event.aggregate_key is None:
            await conn.execute(
                """INSERT INTO security_events
                          (occurred_at, last_occurred_at, kind, subject, session_id, peer, detail)
                   VALUES ($1, $1, $2, $3, $4, $5, $6)""",
                now,
                event.kind,
                event.subject,
                event.session_id,
                event.peer,
                json.dumps(event.detail or {}),
            )
            return
        window = self._event_window
        window_start = datetime.fromtimestamp(math.floor(now.timestamp() / window) * window, tz=UTC)
        # One statement, so replicas counting the same key at once add up in one row.
        await conn.execute(
            """INSERT INTO security_events AS e
                      (occurred_at, last_occurred_at, kind, subject, session_id, peer, detail,
                       occurrences, aggregate_key, aggregate_window)
               VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (kind, aggregate_key, aggregate_window)
                  WHERE aggregate_key IS NOT NULL
               DO UPDATE
                     SET occurrences = e.occurrences + excluded.occurrences,
                         last_occurred_at = greatest(e.last_occurred_at, excluded.occurred_at)""",
            now,
            event.kind,
            event.subject,
            event.session_id,
            event.peer,
            json.dumps(event.detail or {}),
            occurrences,
            event.aggregate_key,
            window_start,
        )
