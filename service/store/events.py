"""Security events: recorded in the transaction of the change they describe, or alone;
what a client can repeat cheaply counted in one row per kind, key and window."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service.domain.records import SecurityEvent
from service.store.base import StoreBase


async def insert_event(
    conn: asyncpg.Connection,
    event: SecurityEvent,
    now: datetime,
    *,
    window: float,
    occurrences: int = 1,
) -> None:
    """Record `event` on `conn` (in its transaction, if any); an aggregated one is counted
    in the row of its kind and key for the `window` that `now` falls in."""
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


class EventWriter(StoreBase):
    """What every part that records events in its own transactions shares."""

    async def _insert_event(
        self, conn: asyncpg.Connection, event: SecurityEvent, now: datetime, occurrences: int = 1
    ) -> None:
        await insert_event(conn, event, now, window=self._event_window, occurrences=occurrences)


class PostgresSecurityEvents(EventWriter):
    """The audit trail."""

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
