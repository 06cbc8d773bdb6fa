"""The janitor: deletes what can never be used again, so the database does not grow without
bound under steady load (sessions once no access token of theirs can be alive, old security
events, spent throttle counts, deleted users, retired keys, the revocation log's expired
rows); before that, writes `revoked_at`
into the sessions their user's revocation ended (`CATCH_UP_BATCH` per statement); and
retires and rotates signing keys. What, when and why: docs/operations.md, "Clean-up".

Used refresh tokens of live sessions are kept on purpose: they are what reuse detection
recognises when a stolen old token comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from service.clock import Clock, to_datetime
from service.domain.ports import JanitorStorage, PurgeBatch, Purger
from service.domain.revocation import forgettable_before
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import NoTelemetry, Telemetry
from service.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500
"""Rows per batch: each batch is one short transaction, far inside AUTH_DB_TIMEOUT."""
CATCH_UP_BATCH = 5000
"""Sessions per statement of the revocation catch-up (about 0.1 s each here)."""
CATCH_UP_MAX_BATCHES = 200
"""Statements per run: a user with millions of sessions is caught up over a few runs,
and the clean-up after it is not held up."""
STEP_BUDGET = 10.0
"""Seconds one step may keep going in one pass (plus the batch under way); a backlog
longer than that continues in the next pass, after the other tables had their turn."""

# Names of the steps outside the tables' own clean-up (metric labels and log lines).
KEY_UPKEEP = "signing_key_upkeep"
USER_REVOCATION_CATCH_UP = "user_revocations"
JANITOR_PASS = "pass"

Cursor = tuple[datetime, str] | None
"""Where a step's previous batch ended (None at the start of the pass)."""


@dataclass(frozen=True, slots=True)
class JanitorStep:
    """One independent clean-up job: batches until one examines fewer than `batch` rows,
    or the step's time budget is spent."""

    name: str
    """The table (or job) it cleans: the metric label and the key of run_once's result."""
    run_batch: Callable[[Cursor], Awaitable[PurgeBatch]]
    batch: int = BATCH
    updates: bool = False
    """Its job is to update rows (`repaired`), not to delete them: a repair is no alarm."""


class Janitor:
    """Runs the clean-up now and then; the store makes sure one replica at a time does."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JanitorStorage,
        keys: SigningKeys,
        clock: Clock,
        telemetry: Telemetry | None = None,
        step_budget: float = STEP_BUDGET,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keys = keys
        self._clock = clock
        self._telemetry = telemetry or NoTelemetry()
        self._step_budget = step_budget

    def _steps(self, purger: Purger) -> list[JanitorStep]:
        """This pass's steps, in order: sessions first (deleted users wait for them)."""
        settings = self._settings
        now = self._clock.now()
        dead_before = to_datetime(forgettable_before(now))
        retention = to_datetime(now - settings.event_retention)
        throttle_expired = to_datetime(now - settings.throttle_window)

        def purge(table: str, cutoff: datetime) -> JanitorStep:
            async def run(after: Cursor) -> PurgeBatch:
                return await purger.purge_batch(table, cutoff, batch=BATCH, after=after)

            return JanitorStep(table, run)

        async def backfill(_after: Cursor) -> PurgeBatch:
            return await purger.backfill_purge_after(batch=BATCH)

        return [
            # Sessions written before migration 0008 get their purge time first.
            JanitorStep("sessions_backfill", backfill, updates=True),
            purge("sessions", dead_before),
            purge("users", dead_before),
            purge("signing_keys", retention),
            purge("security_events", retention),
            purge("login_throttle", throttle_expired),
            # keep_until holds the leeway and margin already.
            purge("revocation_log", to_datetime(now)),
        ]

    async def run_once(self) -> dict[str, int] | None:
        """One pass; rows deleted per step, or None if another replica is at it. A step
        that fails is logged and counted, and the others run all the same."""
        await self._key_upkeep()
        # Before the purge, so that sessions their user's revocation ended are marked (and
        # so purgeable) in the same pass; its failure must not stop the clean-up either.
        try:
            await self.catch_up_user_revocations()
        except Exception as exc:
            self._failed(USER_REVOCATION_CATCH_UP, exc, done=0)
        async with self._store.janitor_turn() as purger:
            if purger is None:
                return None
            done: dict[str, int] = {}
            for step in self._steps(purger):
                done[step.name] = await self._run_step(step)
        return done

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

    async def _key_upkeep(self) -> None:
        # Key upkeep takes its own lock (rotation must be serialized with admin calls), and
        # its failure must not keep the clean-up from running.
        settings = self._settings
        try:
            if settings.key_rotation_period:
                await self._keys.rotate_if_due(settings.key_rotation_period)
            await self._keys.retire_superseded()
        except Exception as exc:
            self._failed(KEY_UPKEEP, exc, done=0)

    async def _run_step(self, step: JanitorStep) -> int:
        """Batches of one step until it is done or its budget is spent; rows deleted.
        Never raises an Exception: a failure is logged and counted."""
        started = time.monotonic()
        done = repaired = batches = 0
        after: Cursor = None
        try:
            while True:
                result = await step.run_batch(after)
                batches += 1
                done += result.deleted
                repaired += result.repaired
                after = result.after
                if result.examined < step.batch:
                    break
                if time.monotonic() - started >= self._step_budget:
                    log.info(
                        "janitor: %s: time budget (%.0f s) spent after %d batches; "
                        "the rest waits for the next pass",
                        step.name,
                        self._step_budget,
                        batches,
                    )
                    break
        except Exception as exc:
            self._failed(step.name, exc, done=done)
        finally:
            if done:
                self._telemetry.janitor_deleted(step.name, done)
        if repaired and not step.updates:
            # A writer left a wrong purge time (an older replica during an upgrade?):
            # the rows were kept and given the right one.
            log.warning(
                "janitor: %s: %d rows had a wrong purge time, corrected", step.name, repaired
            )
        log.log(
            logging.INFO if done or repaired else logging.DEBUG,
            "janitor: %s: %d deleted, %d updated, in %d batches, %.3f s",
            step.name,
            done,
            repaired,
            batches,
            time.monotonic() - started,
        )
        return done

    def _failed(self, step: str, exc: Exception, *, done: int) -> None:
        cause = exc.__cause__ or exc.__context__
        log.warning(
            "janitor: %s failed after %d rows (%s%s); the other tables go on, retried next pass",
            step,
            done,
            type(exc).__name__,
            "" if cause is None else f": {type(cause).__name__}",
        )
        log.debug("janitor: %s failure", step, exc_info=exc)
        self._telemetry.janitor_failed(step)

    async def run_forever(self, *, may_run: Callable[[], bool] = lambda: True) -> None:
        """A pass every AUTH_JANITOR_INTERVAL, skipped while `may_run` says no."""
        while True:
            await asyncio.sleep(self._settings.janitor_interval)
            if not may_run():
                continue
            try:
                await self.run_once()
            except Exception as exc:  # a failed pass is retried next time, never silently
                self._failed(JANITOR_PASS, exc, done=0)
