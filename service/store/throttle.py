"""Login throttle counts, per key (a username, an address), shared by every replica."""

from __future__ import annotations

from datetime import datetime

from service.domain.records import ThrottleSettlement, ThrottleState, UserRecord
from service.store.base import StoreBase

# A login attempt's reservation in one round trip (autocommit), by the function of
# migration 0013 (as migration 0015 changed it): the keys' rows locked in key order,
# `decide_reservation` applied, the counts written if it counts the attempt; with $6, the
# live user of that username key read under the keys' locks (for a counted attempt only).
RESERVE_LOGIN_ATTEMPT_SQL = """
SELECT r_key, r_failures, r_last_failure_at, r_locked_until, r_pending, r_pending_at,
       r_reserved, u_id, u_username, u_password_hash, u_scopes, u_disabled, u_created_at
  FROM reserve_login_attempt($1, $2, $3, $4, $5, $6)
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

# A success is settled by the login's session statement (`start_session`, migration
# 0015); this is the same function called alone, for a success that starts no session.
SETTLE_LOGIN_SUCCESS_SQL = "SELECT settle_login_success($1, $2, $3, $4)"


def settlement_arguments(
    settlement: ThrottleSettlement,
) -> tuple[list[str], list[bool], list[datetime], datetime]:
    """`settle_login_success`'s arguments (keys, clear, previous failure, reserved at)."""
    keys = list(settlement.previous_failure_at)
    return (
        keys,
        [key in settlement.clear for key in keys],
        list(settlement.previous_failure_at.values()),
        settlement.reserved_at,
    )


class PostgresThrottle(StoreBase):
    """The `login_throttle` table."""

    async def reserve_login_attempt(
        self,
        limits: dict[str, tuple[int, datetime]],
        *,
        now: datetime,
        pending_since: datetime,
        username_key: str | None = None,
    ) -> tuple[list[ThrottleState], bool, UserRecord | None]:
        """Lock the keys' rows (made if missing) and, when `decide_reservation` counts the
        attempt (each key's (free failures, window start) in `limits`), count it, stamped
        `now`: the rows as read, in key order, whether it was counted, and (for a counted
        attempt, with `username_key`) the live user of that key. One statement.

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
                username_key,
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
        user = None
        if rows and rows[0]["u_id"] is not None:
            first = rows[0]
            user = UserRecord(
                id=first["u_id"],
                username=first["u_username"],
                password_hash=first["u_password_hash"],
                scopes=tuple(first["u_scopes"]),
                disabled=first["u_disabled"],
                created_at=first["u_created_at"],
            )
        return states, bool(rows) and rows[0]["r_reserved"], user

    async def settle_login_failure(self, until: dict[str, datetime | None]) -> None:
        """An attempt reserved against these keys failed: it stays counted, is no longer
        pending, and each key with a time waits until then (never shortening a wait)."""
        async with self._connection() as conn:
            await conn.execute(
                SETTLE_LOGIN_FAILURE_SQL,
                list(until),
                list(until.values()),
            )

    async def settle_login_success(self, settlement: ThrottleSettlement) -> None:
        """A success that starts no session (the session's statement settles the others)."""
        async with self._connection() as conn:
            await conn.execute(SETTLE_LOGIN_SUCCESS_SQL, *settlement_arguments(settlement))
