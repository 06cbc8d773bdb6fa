"""Refused admin calls, recorded as `admin_call_refused` security events (docs/operations.md,
"Security events that clients can repeat"): an audit trail that only shows what succeeded
hides the probing before it.

One recorder for both kinds of refusal:
- `record`: a method refused the call (unknown user, bad argument, ...); written before
  the answer goes out, one call at a time.
- `count`: caller authentication refused it before any method ran (`service.api.callers`).
  Such a call costs its sender next to nothing, so these are counted in memory per actor,
  method, reason and address, and each count is added to its aggregated row in the
  background at most once a second: a flood becomes neither as many rows nor as many
  writes, and the refusal is not held up by a slow database.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from service.domain.events import peer_address
from service.domain.records import CallerInfo
from service.domain.users import UserDirectory
from service.errors import AuthError

MAX_KEYS_PENDING = 100
"""Distinct (actor, method, reason, address) counts waiting to be written; refusals
beyond them are only logged (by the caller check)."""
WRITE_INTERVAL = 1.0
"""The least time, seconds, between two writes of the counts."""


@dataclass(slots=True)
class _Pending:
    first_peer: str | None
    count: int


class AdminRefusals:
    """Records refused admin calls through the user directory."""

    def __init__(self, users: UserDirectory) -> None:
        self._users = users
        # (method, reason, actor, address) -> refusals not yet written
        self._pending: dict[tuple[str, str, str, str], _Pending] = {}
        self._writer: asyncio.Task[None] | None = None

    async def record(self, *, method: str, reason: str, caller: CallerInfo) -> None:
        """Record one refusal now; a failure to record it never hides the answer."""
        with contextlib.suppress(AuthError):
            await self._users.record_refusal(method=method, reason=reason, caller=caller)

    async def count(
        self, full_method: str, reason: str, peer: str | None, service: str | None
    ) -> None:
        """Count a call refused for its credentials (`service`: the known service that
        made it, None if none did); written in the background."""
        actor = f"admin:{service or 'unauthenticated'}"
        key = (full_method.rpartition("/")[2], reason, actor, peer_address(peer))
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.count += 1
        elif len(self._pending) < MAX_KEYS_PENDING:
            self._pending[key] = _Pending(peer, 1)
        if self._writer is None or self._writer.done():
            # Referenced until done, so the task is not collected mid-way.
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending:
            batch = list(self._pending.items())
            self._pending.clear()
            for (method, reason, actor, _), waiting in batch:
                with contextlib.suppress(AuthError):
                    await self._users.record_refusal(
                        method=method,
                        reason=reason,
                        caller=CallerInfo(peer=waiting.first_peer, actor=actor),
                        occurrences=waiting.count,
                    )
            if self._pending:  # more came in meanwhile: counted on, written a second later
                await asyncio.sleep(WRITE_INTERVAL)
