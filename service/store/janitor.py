"""The janitor's statements: bounded batches of clean-up, each through an index, and the
catch-up that writes into sessions the revocation of their user. One replica at a time
runs them, holding an advisory lock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg

from service.domain.ports import PurgeBatch
from service.errors import DatabaseUnavailable
from service.store.base import (
    UNAVAILABLE_ERRORS,
    StoreBase,
    release_session_lock,
    try_session_lock,
)
from service.store.revocations import SESSION_PURGE_AFTER, purge_after_on_revoke

# Held by the one replica whose janitor is running.
_JANITOR_LOCK_ID = 0x6A616E69  # "jani"
# Held by the one replica catching up on users' revocations (a janitor step of its own).
_CATCH_UP_LOCK_ID = 0x63617463  # "catc"

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
    # The revocation log's rows past their keep_until (the cutoff is now: keep_until has
    # the margin in it); the horizon rises to the largest sequence deleted, so a reader
    # whose cursor is below it reads the log in full rather than miss a row.
    "revocation_log": """
        WITH gone AS (
            DELETE FROM revocation_log WHERE id = ANY(ARRAY(
                SELECT id FROM revocation_log WHERE keep_until < $1
                 ORDER BY keep_until LIMIT $2))
            RETURNING sequence),
        horizon AS (
            UPDATE revocation_log_horizon
               SET compacted_through = greatest(compacted_through, (SELECT max(sequence) FROM gone))
             WHERE EXISTS (SELECT 1 FROM gone) RETURNING 1)
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


class PostgresJanitor(StoreBase):
    """The janitor's lock and its batches."""

    @asynccontextmanager
    async def janitor_turn(self) -> AsyncIterator[Purger | None]:
        """The janitor's lock, held on one connection while inside (None: another
        replica's janitor is running). Each call of the Purger is one short transaction
        on that connection."""
        async with self._connection() as conn:
            if not await try_session_lock(conn, _JANITOR_LOCK_ID):
                yield None
                return
            try:
                # Waiting behind a row or table lock gains nothing: give up well before
                # the statement timeout, the next pass tries again.
                yield Purger(conn, lock_timeout=min(1.0, self._timeout * 0.9))
            finally:
                await release_session_lock(conn, _JANITOR_LOCK_ID)

    async def catch_up_user_revocations(self, *, batch: int, max_batches: int) -> int | None:
        """Write revoked_at and revoke_reason (the user's) into sessions that their user's
        revocation ended, `batch` sessions per statement (each its own transaction), at
        most `max_batches` statements; how many sessions were written. None if another
        replica is at it. What revokes those sessions is the user's generation; this only
        lets the admin views and the clean-up catch up."""
        async with self._connection() as conn:
            if not await try_session_lock(conn, _CATCH_UP_LOCK_ID):
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
                await release_session_lock(conn, _CATCH_UP_LOCK_ID)
