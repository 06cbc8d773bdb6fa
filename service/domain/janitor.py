"""The janitor: deletes what can never be used again, so the database does not grow without
bound under steady load (sessions once no access token of theirs can be alive, old security
events, spent throttle counts, deleted users, retired keys); before that, writes `revoked_at`
into the sessions their user's revocation ended (`CATCH_UP_BATCH` per statement); and
retires and rotates signing keys. What, when and why: docs/operations.md, "Clean-up".

Used refresh tokens of live sessions are kept on purpose: they are what reuse detection
recognises when a stolen old token comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from service.clock import Clock, to_datetime
from service.domain.revocation import forgettable_before
from service.domain.signing_keys import SigningKeys
from service.settings import Settings
from service.store.postgres import PostgresStore

log = logging.getLogger(__name__)

BATCH = 500
CATCH_UP_BATCH = 5000
"""Sessions per statement of the revocation catch-up (about 0.1 s each here)."""
CATCH_UP_MAX_BATCHES = 200
"""Statements per run: a user with millions of sessions is caught up over a few runs,
and the clean-up after it is not held up."""


class Janitor:
    """Runs the clean-up now and then; the store makes sure one replica at a time does."""

    def __init__(
        self, *, settings: Settings, store: PostgresStore, keys: SigningKeys, clock: Clock
    ) -> None:
        self._settings = settings
        self._store = store
        self._keys = keys
        self._clock = clock

    async def run_once(self) -> dict[str, int] | None:
        """One pass; rows deleted per table, or None if another replica is at it."""
        settings = self._settings
        # Key upkeep takes its own lock (rotation must be serialized with admin calls), and
        # its failure must not keep the clean-up below from running.
        try:
            if settings.key_rotation_period:
                await self._keys.rotate_if_due(settings.key_rotation_period)
            await self._keys.retire_superseded()
        except Exception as exc:
            log.warning(
                "janitor: signing-key upkeep failed (%s); retried next run", type(exc).__name__
            )
        try:
            await self.catch_up_user_revocations()
        except Exception as exc:
            log.warning(
                "janitor: revocation catch-up failed (%s); retried next run", type(exc).__name__
            )
        now = self._clock.now()
        dead_before = forgettable_before(now)
        deleted = await self._store.purge(
            {
                "sessions": to_datetime(dead_before),
                "users": to_datetime(dead_before),
                "signing_keys": to_datetime(now - settings.event_retention),
                "security_events": to_datetime(now - settings.event_retention),
                "login_throttle": to_datetime(now - settings.throttle_window),
            },
            batch=BATCH,
        )
        if deleted and any(deleted.values()):
            log.info("janitor deleted %s", ", ".join(f"{k}: {v}" for k, v in deleted.items()))
        return deleted

    async def catch_up_user_revocations(
        self, *, max_batches: int = CATCH_UP_MAX_BATCHES
    ) -> int | None:
        """Write revoked_at into sessions their user's revocation ended, in bounded batches;
        how many, or None if another replica is at it."""
        written = await self._store.catch_up_user_revocations(
            batch=CATCH_UP_BATCH, max_batches=max_batches
        )
        if written:
            log.info("janitor marked %d sessions revoked with their user", written)
        return written

    async def run_forever(self, *, may_run: Callable[[], bool] = lambda: True) -> None:
        """A pass every AUTH_JANITOR_INTERVAL, skipped while `may_run` says no."""
        while True:
            await asyncio.sleep(self._settings.janitor_interval)
            if not may_run():
                continue
            with contextlib.suppress(Exception):  # a failed pass is retried next time
                await self.run_once()
