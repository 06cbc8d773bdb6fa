"""Snapshots in parts: authsvc sends a snapshot of more than 10,000 entries as several
updates (the first with `snapshot`, every one but the last with sequence 0). LocalValidator
applies it only once its last part is in; a part is never a heartbeat nor a delta, and a
stream cut mid-snapshot leaves what the validator held untouched."""

from __future__ import annotations

import asyncio

from authsvc_client.gen.auth.v1 import auth_pb2
from fake_authsvc import FakeAuthsvc, ManualClock, ValidatorFactory, timestamp, until


async def test_a_first_snapshot_in_parts_is_all_in_before_start_returns(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    fake.snapshot_part_entries = 3
    for i in range(8):
        fake.revoke_session(f"s-{i}")
    fake.revoke_user("eve", 2)
    fake.revoke_user("mallory", 1)  # 10 entries: parts of 3, 3, 3 and 1
    v = await make_validator()
    assert v.revoked_sessions == 8
    assert v.revoked_users == 2
    assert v.sequence == fake.head
    assert v.snapshots_applied == 1
    assert v.snapshot_parts == 4
    assert v.validate(fake.token(sid="s-7")).error == "REVOKED"
    assert v.validate(fake.token(sub="mallory", sid="x", ugen=0)).error == "REVOKED"
    assert v.validate(fake.token(sid="s-8")).valid


async def test_the_parts_of_a_snapshot_change_nothing_until_the_last_one(
    fake: FakeAuthsvc, make_validator: ValidatorFactory, mono: ManualClock
) -> None:
    """A validator holding a state gets a new snapshot in parts (its position was
    compacted away): until the last part it answers from what it held, at its old
    position and staleness; a sequence-0 part is not taken for a heartbeat."""
    fake.revoke_session("forgotten")
    v = await make_validator(max_staleness=5.0)
    held_sequence = v.sequence
    # No await from here to the end of the set-up: the validator reconnects to all of it.
    fake.drop_streams()
    del fake.sessions["forgotten"]
    for i in range(5):
        fake.revoke_session(f"new-{i}")
    fake.compact()
    fake.snapshot_part_entries = 2  # parts of 2, 2 and 1
    fake.between_snapshot_parts = asyncio.Event()
    mono.advance(3.0)
    await until(lambda: v.snapshot_parts == 2)  # the first part of the new snapshot is in
    assert v.snapshots_applied == 1
    assert v.sequence == held_sequence
    assert v.is_session_revoked("forgotten")
    assert not v.is_session_revoked("new-0")
    assert v.heartbeats == 0
    assert v.staleness == 3.0  # a part is not news: the held state is as old as it was
    assert v.validate(fake.token(sid="forgotten")).error == "REVOKED"
    fake.between_snapshot_parts.set()
    await until(lambda: v.snapshots_applied == 2)
    assert v.snapshot_parts == 4
    assert v.sequence == fake.head
    assert not v.is_session_revoked("forgotten")
    assert all(v.is_session_revoked(f"new-{i}") for i in range(5))
    assert v.staleness == 0.0
    assert v.heartbeats == 0


async def test_a_stream_cut_mid_snapshot_leaves_the_held_state_and_resumes_from_it(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    fake.revoke_session("held")
    v = await make_validator()
    held_sequence = v.sequence
    # No await from here to the end of the set-up: the validator reconnects to all of it.
    fake.drop_streams()
    for i in range(5):
        fake.revoke_session(f"new-{i}")
    fake.compact()
    fake.snapshot_part_entries = 2  # parts of 2, 2 and 2
    fake.cut_snapshot_after_parts = 2  # this stream ends after two of them
    fake.between_snapshot_parts = asyncio.Event()  # then the next stops after its first
    await until(lambda: len(fake.watch_requests) == 3 and v.snapshot_parts == 4)
    # asked again from the position it holds, which the cut stream did not move
    assert fake.watch_requests == [0, held_sequence, held_sequence]
    assert v.sequence == held_sequence
    assert v.snapshots_applied == 1
    assert v.revoked_sessions == 1
    assert v.is_session_revoked("held")
    fake.between_snapshot_parts.set()
    await until(lambda: v.snapshots_applied == 2)
    assert v.sequence == fake.head
    assert v.revoked_sessions == 6


async def test_revocations_without_a_sequence_outside_a_snapshot_are_refused(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    """Entries with sequence 0 can only be a snapshot's part: outside one, the stream is
    not to be trusted; the validator reconnects from its position and adds nothing."""
    v = await make_validator()
    stray = auth_pb2.RevocationUpdate(sent_at=timestamp(fake.clock()))
    stray.revoked.add(session_id="stray", keep_until=timestamp(fake.clock() + 60))
    fake.push(stray)
    await until(lambda: len(fake.watch_requests) == 2)
    assert not v.is_session_revoked("stray")
    assert fake.watch_requests == [0, 0]  # its position was (and is) 0: nothing applied
    assert v.heartbeats == 0


async def test_a_heartbeat_between_parts_does_not_complete_the_snapshot(
    fake: FakeAuthsvc, make_validator: ValidatorFactory
) -> None:
    fake.revoke_session("a")
    fake.revoke_session("b")
    fake.snapshot_part_entries = 1
    fake.between_snapshot_parts = asyncio.Event()
    fake.heartbeat_between_snapshot_parts = True
    v = await make_validator(start=False)
    v.start_in_background()
    await until(lambda: v.snapshot_parts == 2)  # the first part, and the heartbeat
    assert v.snapshots_applied == 0
    assert v.heartbeats == 0
    assert not v.fresh
    assert v.validate(fake.token()).error == "VERIFIER_STALE"
    fake.between_snapshot_parts.set()
    await until(lambda: v.fresh)
    assert v.is_session_revoked("a")
    assert v.is_session_revoked("b")
    assert v.snapshot_parts == 3
    assert fake.watch_requests == [0]
