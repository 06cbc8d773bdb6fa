"""Login throttle counts, per key (a username, an address), shared by every replica."""

from __future__ import annotations

from datetime import datetime

from service.domain.records import ThrottleState
from service.store.base import StoreBase

# A login attempt's reservation in one round trip (autocommit), by the function of
# migration 0013: the keys' rows locked in key order, `decide_reservation` applied, the
# counts written if it counts the attempt.
RESERVE_LOGIN_ATTEMPT_SQL = """
SELECT r_key, r_failures, r_last_failure_at, r_locked_until, r_pending, r_pending_at,
       r_reserved
  FROM reserve_login_attempt($1, $2, $3, $4, $5)
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


class PostgresThrottle(StoreBase):
    """The `login_throttle` table."""

    async def reserve_login_attempt(
        self,
        limits: dict[str, tuple[int, datetime]],
        *,
        now: datetime,
        pending_since: datetime,
    ) -> tuple[list[ThrottleState], bool]:
        """Lock the keys' rows (made if missing) and, when `decide_reservation` counts the
        attempt (each key's (free failures, window start) in `limits`), count it, stamped
        `now`: the rows as read, in key order, and whether it was counted. One statement.

        The row lock makes check and count one step per key, on every replica; the rows
        are locked in key order, so two attempts sharing keys cannot deadlock.
        """
        keys = sorted(limits)
        async with self._connection() as conn:
            rows = await conn.fetch(
                RESERVE_LOGIN_ATTEMPT_SQL,
                keys,
                now,
                pending_since,
                [limits[key][0] for key in keys],
                [limits[key][1] for key in keys],
            )
        states = [
            ThrottleState(
                key=row["r_key"],
                failures=row["r_failures"],
                last_failure_at=row["r_last_failure_at"],
                locked_until=row["r_locked_until"],
                pending=row["r_pending"],
                pending_at=row["r_pending_at"],
            )
            for row in rows
        ]
        return states, bool(rows) and rows[0]["r_reserved"]

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
