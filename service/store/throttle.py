"""Login throttle counts, per key (a username, an address), shared by every replica."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import asyncpg

from service.domain.records import ThrottleSettlement, ThrottleState, UserRecord
from service.store.base import StoreBase
from service.store.users import user_record

# A login attempt's reservation in one round trip (autocommit), by the function of
# migration 0013 (as migration 0015 changed it): the keys' rows locked in key order,
# `decide_reservation` applied, the counts written if it counts the attempt; with $6, the
# live user of that username key read under the keys' locks (for a counted attempt only).
RESERVE_LOGIN_ATTEMPT_SQL = """
SELECT r_key, r_failures, r_last_failure_at, r_locked_until, r_pending, r_pending_at,
       r_reserved, u_id, u_username, u_password_hash, u_scopes, u_disabled, u_created_at
  FROM reserve_login_attempt($1, $2, $3, $4, $5, $6)
"""

# A failed attempt is settled in a transaction: its keys' rows locked in key order (as
# everywhere, so attempts sharing keys cannot deadlock) and read, the domain's rule
# (`decide_failure_waits`) applied to them, then the update.
LOCK_THROTTLE_KEYS_SQL = """
SELECT key, failures, last_failure_at, locked_until, pending, pending_at
  FROM login_throttle WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE
"""

SETTLE_LOGIN_FAILURE_SQL = """
UPDATE login_throttle AS t
   SET pending = greatest(t.pending - 1, 0),
       locked_until = greatest(t.locked_until, v.until)
  FROM unnest($1::text[], $2::timestamptz[]) AS v(key, until)
 WHERE v.key = t.key
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


def _state(row: asyncpg.Record, *, prefix: str = "") -> ThrottleState:
    return ThrottleState(
        key=row[prefix + "key"],
        failures=row[prefix + "failures"],
        last_failure_at=row[prefix + "last_failure_at"],
        locked_until=row[prefix + "locked_until"],
        pending=row[prefix + "pending"],
        pending_at=row[prefix + "pending_at"],
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
        states = [_state(row, prefix="r_") for row in rows]
        user = None
        if rows and rows[0]["u_id"] is not None:
            user = user_record(rows[0], prefix="u_")
        return states, bool(rows) and rows[0]["r_reserved"], user

    async def settle_login_failure(
        self,
        keys: list[str],
        decide: Callable[[list[ThrottleState]], dict[str, datetime | None]],
    ) -> None:
        """An attempt reserved against these keys failed: under their rows' lock, it stays
        counted, is no longer pending, and each key waits until `decide` says (never
        shortening a wait). A row the janitor deleted meanwhile is left out."""
        async with self._transaction() as conn:
            rows = await conn.fetch(LOCK_THROTTLE_KEYS_SQL, sorted(keys))
            until = decide([_state(row) for row in rows])
            await conn.execute(SETTLE_LOGIN_FAILURE_SQL, list(until), list(until.values()))

    async def settle_login_success(self, settlement: ThrottleSettlement) -> None:
        """A success that starts no session (the session's statement settles the others)."""
        async with self._connection() as conn:
            await conn.execute(SETTLE_LOGIN_SUCCESS_SQL, *settlement_arguments(settlement))
