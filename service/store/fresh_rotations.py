"""Fresh rotations sent in batches: the refreshes of one process that arrive while others
are in flight go to PostgreSQL together, in one statement (`ROTATE_FRESH_TOKEN_SQL` over
arrays), so that a statement's fixed costs (its round trip, the protocol on both sides,
a snapshot, a commit and its WAL flush) are paid once for many rotations.

A call that finds no batch in flight goes at once (no wait when the process is idle); the
others wait for the batch to come back, and the next batch takes everything waiting (up to
`MAX_BATCH_SIZE`); a full batch waiting goes beside the one in flight (up to
`MAX_BATCHES_IN_FLIGHT`). A batch in flight for longer than `STUCK_AFTER` (it waits
for a row lock, or PostgreSQL is slow) stops counting against that bound, so that the calls
behind it go on without it. Each caller gets its own row, exactly as its own statement
would have given it: the statement judges and writes every item on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from service.clock import Clock
from service.errors import DatabaseUnavailable

# One batch in flight, and a second beside it only when a full batch waits. Measured
# under the bench's Refresh load (64 calls at once, one process, PostgreSQL on the same 2
# cores): with two in flight whenever calls wait, the second went almost at once, batches
# held ~2 calls, PostgreSQL ~150 us and the server ~355 us a refresh; with one, ~4.5 calls,
# ~85 us and ~310 us, and ~15 % more refreshes a second. The second slot is there for a
# batch stuck on a row lock (another transaction holding a session or user row): the calls
# behind it then go on in full batches instead of all waiting for it.
MAX_BATCHES_IN_FLIGHT = 2

# How long a batch may be in flight before it no longer holds up the calls behind it
# (seconds, by the service's clock). Under the bench's Refresh load a batch comes back in
# ~2-20 ms (p99 of a refresh ~22 ms); one that takes longer waits for a row lock (a
# revocation, a reuse, a user's change holds its session's or user's row) or for a slow
# database, and the process's other refreshes should not wait with it: below a full batch
# waiting they would, until it came back. It still holds its connection and its tokens.
STUCK_AFTER = 0.05

# A bound on one statement's work and locks (its parameters grow with it); more calls
# than this waiting go in the batches that follow.
MAX_BATCH_SIZE = 64


@dataclass(frozen=True, slots=True)
class FreshRotation:
    """One call of `rotate_if_fresh`: its token and what a rotation of it would write."""

    token_hash: bytes
    now: datetime
    child_hash: bytes
    idle_expires_at: datetime
    audiences: frozenset[str]
    access_expires_at: datetime
    user_bound: datetime
    peer: str | None


# Sends one batch (tokens distinct, audiences shared) in one statement: for each item, in
# order, its row (None: unknown token).
SendBatch = Callable[[Sequence[FreshRotation]], Awaitable[Sequence[asyncpg.Record | None]]]


@dataclass(slots=True)
class _Batch:
    """A batch sent: its calls, and whether it still counts against the bound on batches in
    flight (until it comes back or is found stuck)."""

    items: list[_Waiting]
    sent_at: float
    counted: bool = True
    stuck_timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Waiting:
    rotation: FreshRotation
    # Its caller's answer: done (cancelled) when the caller stopped waiting.
    answer: asyncio.Future[asyncpg.Record | None]
    # Once sent: its batch and the task running the batch's statement.
    batch: _Batch | None = None
    task: asyncio.Task[None] | None = None


class FreshRotationBatches:
    """The calls of one process waiting for their rotation, and the batches in flight."""

    def __init__(
        self,
        send_batch: SendBatch,
        *,
        clock: Clock,
        stuck_after: float = STUCK_AFTER,
        max_in_flight: int = MAX_BATCHES_IN_FLIGHT,
        max_batch_size: int = MAX_BATCH_SIZE,
    ) -> None:
        self._send_batch = send_batch
        self._clock = clock
        self._stuck_after = stuck_after
        self._max_in_flight = max_in_flight
        self._max_batch_size = max_batch_size
        self._waiting: list[_Waiting] = []
        # The batches in flight that count against `max_in_flight` (not those found stuck).
        self._in_flight = 0
        # The tokens of the batches in flight: the same token again waits for the next
        # batch (which finds it used, as a second statement would), never goes beside it.
        self._tokens_in_flight: set[bytes] = set()
        # The batches' own tasks, kept from the garbage collector until they end.
        self._tasks: set[asyncio.Task[None]] = set()

    async def rotate(self, rotation: FreshRotation) -> asyncpg.Record | None:
        """The statement's row for `rotation` (None: unknown token), sent in a batch.
        Cancelled (its caller left: a deadline, a cancelled call), the caller stops waiting:
        its item is dropped if not sent yet; a batch already sent goes on for the others in
        it, and is cancelled, its statement with it, once all of them have left (a caller's
        deadline still stops the database work done for it alone, as a statement of its own
        would)."""
        answer: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(rotation, answer)
        self._waiting.append(waiting)
        self._send_what_can_go()
        try:
            return await answer
        except asyncio.CancelledError:
            batch, task = waiting.batch, waiting.task
            if (
                batch is not None
                and task is not None
                and all(item.answer.done() for item in batch.items)
            ):
                task.cancel()
            raise

    def _send_what_can_go(self) -> None:
        while self._in_flight < self._max_in_flight:
            if self._in_flight and len(self._waiting) < self._max_batch_size:
                return  # they go together when the batch in flight comes back
            items = self._next_batch()
            if not items:
                return
            self._in_flight += 1
            self._tokens_in_flight.update(item.rotation.token_hash for item in items)
            batch = _Batch(items, sent_at=self._clock.now())
            loop = asyncio.get_running_loop()
            batch.stuck_timer = loop.call_later(self._stuck_after, self._check_stuck, batch)
            # A task of its own: no caller's cancellation cancels the others' statement.
            task = loop.create_task(self._run(batch))
            for item in items:
                item.batch, item.task = batch, task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _check_stuck(self, batch: _Batch) -> None:
        """Run by the batch's timer: once it has been in flight for `stuck_after` by the
        service's clock, it stops counting against the bound and what waits may go. (The
        timer runs on the loop's clock; a clock that moved less, a test's, sets it again.)"""
        age = self._clock.now() - batch.sent_at
        if age < self._stuck_after:
            batch.stuck_timer = asyncio.get_running_loop().call_later(
                self._stuck_after - age, self._check_stuck, batch
            )
            return
        batch.stuck_timer = None
        batch.counted = False
        self._in_flight -= 1
        self._send_what_can_go()

    def _next_batch(self) -> list[_Waiting]:
        """Takes from the waiting calls, oldest first, those that may go together: of the
        same audiences, tokens distinct from each other and from those in flight."""
        batch: list[_Waiting] = []
        tokens: set[bytes] = set()
        audiences: frozenset[str] | None = None
        still_waiting: list[_Waiting] = []
        for item in self._waiting:
            if item.answer.done():
                continue  # its caller left before it was sent
            rotation = item.rotation
            if (
                len(batch) < self._max_batch_size
                and rotation.token_hash not in tokens
                and rotation.token_hash not in self._tokens_in_flight
                and (audiences is None or rotation.audiences == audiences)
            ):
                batch.append(item)
                tokens.add(rotation.token_hash)
                audiences = rotation.audiences
            else:
                still_waiting.append(item)
        self._waiting = still_waiting
        return batch

    async def _run(self, batch: _Batch) -> None:
        try:
            await self._answer(batch.items)
        finally:
            for item in batch.items:
                if not item.answer.done():  # this task was cancelled (the loop stops)
                    item.answer.cancel()
            if batch.stuck_timer is not None:
                batch.stuck_timer.cancel()
            if batch.counted:
                self._in_flight -= 1
            self._tokens_in_flight.difference_update(
                item.rotation.token_hash for item in batch.items
            )
            self._send_what_can_go()

    async def _answer(self, batch: list[_Waiting]) -> None:
        """Sends `batch` and answers its callers. A statement PostgreSQL refused (a deadlock,
        a serialization failure, any error but a lost connection) rolled the whole batch
        back: each item is sent again alone, so that one item's trouble is its own."""
        try:
            rows = await self._send_batch([item.rotation for item in batch])
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            for item in batch:
                if not item.answer.done():
                    await self._answer([item])
            return
        except DatabaseUnavailable as exc:
            # Each caller its own error (one exception raised in several tasks would gather
            # their tracebacks), caused by the same connection trouble.
            for item in batch:
                if not item.answer.done():
                    unavailable = DatabaseUnavailable()
                    unavailable.__cause__ = exc.__cause__
                    item.answer.set_exception(unavailable)
            return
        except Exception as exc:
            _fail(batch, exc)
            return
        for item, row in zip(batch, rows, strict=True):
            if not item.answer.done():
                item.answer.set_result(row)


def _fail(batch: list[_Waiting], exc: Exception) -> None:
    for item in batch:
        if not item.answer.done():
            item.answer.set_exception(exc)
