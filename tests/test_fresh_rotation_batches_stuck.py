"""A batch of fresh rotations stuck in flight (`service.store.fresh_rotations`), over an
in-memory statement: past `stuck_after` by the service's clock it stops holding up the
calls behind it, and when it comes back the bound on batches in flight is what it was.
(Through the real store and PostgreSQL, with a row lock: test_fresh_rotation_batches.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from service.clock import ManualClock
from service.store.fresh_rotations import FreshRotation, FreshRotationBatches

STUCK_AFTER = 0.02  # seconds, by the clock given; the loop's timer rechecks this often
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _rotation(token: bytes) -> FreshRotation:
    return FreshRotation(
        token_hash=token,
        now=NOW,
        child_hash=token + b"-child",
        idle_expires_at=NOW,
        audiences=frozenset({"api"}),
        access_expires_at=NOW,
        user_bound=NOW,
        peer=None,
    )


class HeldStatements:
    """Each batch sent waits until its first token is let go; answers each item with its
    token (what a row would be, for these tests)."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self._let_go: dict[bytes, asyncio.Event] = {}

    def let_go(self, token: bytes) -> None:
        self._let_go.setdefault(token, asyncio.Event()).set()

    async def send(self, batch: Sequence[FreshRotation]) -> list[bytes]:
        tokens = [rotation.token_hash for rotation in batch]
        self.sent.append(tokens)
        await self._let_go.setdefault(tokens[0], asyncio.Event()).wait()
        return tokens


async def _settle() -> None:
    """Long enough (real time) for several of the stuck timer's rounds."""
    await asyncio.sleep(STUCK_AFTER * 5)


def _batches(statements: HeldStatements, clock: ManualClock) -> FreshRotationBatches:
    return FreshRotationBatches(
        statements.send,  # tokens stand in for rows here
        clock=clock,
        stuck_after=STUCK_AFTER,
        max_in_flight=1,
    )


async def test_a_batch_in_flight_too_long_no_longer_holds_up_the_next_call() -> None:
    statements, clock = HeldStatements(), ManualClock()
    batches = _batches(statements, clock)
    stuck = asyncio.create_task(batches.rotate(_rotation(b"a")))
    await _settle()
    behind = asyncio.create_task(batches.rotate(_rotation(b"b")))
    await _settle()
    assert statements.sent == [[b"a"]]  # the loop's time alone found nothing stuck

    clock.advance(STUCK_AFTER * 2)
    await _settle()
    assert statements.sent == [[b"a"], [b"b"]]
    statements.let_go(b"b")
    assert await asyncio.wait_for(behind, 5) == b"b"
    assert not stuck.done()

    statements.let_go(b"a")
    assert await asyncio.wait_for(stuck, 5) == b"a"


async def test_a_stuck_batch_that_comes_back_leaves_the_bound_as_it_was() -> None:
    statements, clock = HeldStatements(), ManualClock()
    batches = _batches(statements, clock)
    stuck = asyncio.create_task(batches.rotate(_rotation(b"a")))
    await _settle()
    clock.advance(STUCK_AFTER * 2)
    in_flight = asyncio.create_task(batches.rotate(_rotation(b"b")))
    await _settle()
    assert statements.sent == [[b"a"], [b"b"]]  # "a" found stuck, "b" counted

    statements.let_go(b"a")
    await asyncio.wait_for(stuck, 5)
    waiting = [asyncio.create_task(batches.rotate(_rotation(token))) for token in (b"c", b"d")]
    await _settle()
    # "b" still counts: one batch in flight, so the later calls wait for it, and go together.
    assert statements.sent == [[b"a"], [b"b"]]
    statements.let_go(b"b")
    statements.let_go(b"c")
    assert await asyncio.wait_for(in_flight, 5) == b"b"
    assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [b"c", b"d"]
    assert statements.sent == [[b"a"], [b"b"], [b"c", b"d"]]


async def test_a_batch_that_comes_back_in_time_is_never_found_stuck() -> None:
    statements, clock = HeldStatements(), ManualClock()
    batches = _batches(statements, clock)
    first = asyncio.create_task(batches.rotate(_rotation(b"a")))
    await _settle()
    statements.let_go(b"a")
    await asyncio.wait_for(first, 5)
    clock.advance(STUCK_AFTER * 10)
    await _settle()  # its timer was cancelled: the bound is not lowered for the next
    second = asyncio.create_task(batches.rotate(_rotation(b"b")))
    behind = asyncio.create_task(batches.rotate(_rotation(b"c")))
    await _settle()
    assert statements.sent == [[b"a"], [b"b"]]
    statements.let_go(b"b")
    statements.let_go(b"c")
    await asyncio.wait_for(asyncio.gather(second, behind), 5)
    assert statements.sent == [[b"a"], [b"b"], [b"c"]]
