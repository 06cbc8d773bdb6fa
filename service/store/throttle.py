"""Login throttle counts, per key (a username, an address), shared by every replica."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from service.domain.records import ThrottleState
from service.store.base import StoreBase

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


class PostgresThrottle(StoreBase):
    """The `login_throttle` table."""

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
