"""The settings every replica on one database shares, as recorded by the first `serve`."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from service.domain.records import SecurityEvent
from service.store.events import EventWriter


class PostgresSharedSettings(EventWriter):
    """The `shared_settings` table."""

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
