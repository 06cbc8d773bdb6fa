"""WatchRevocations memory under many cheap streams: a client that opens streams and never
reads them must not make the server hold a private copy of the revocation set per stream
(the snapshot is serialized once and shared; each stream holds at most the one update
being written), and a resume from far behind must cost no more than a snapshot."""

from __future__ import annotations

import asyncio
import tracemalloc

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.api.revocation_watch import MAX_UPDATE_ENTRIES
from tests.live_server import ServerFactory
from tests.watching import Watch, log_revoked_sessions, wait_until

WATCH_METHOD = "/auth.v1.AuthService/WatchRevocations"
REVOKED = 60_000
NEVER_READING = 16


@pytest.mark.parametrize("after_sequence", [0, 1], ids=["snapshot", "resume-from-the-start"])
async def test_never_reading_watchers_do_not_each_hold_a_copy_of_the_revocation_set(
    server_factory: ServerFactory, after_sequence: int
) -> None:
    server = await server_factory()
    hub = server.running.watch_hub
    await log_revoked_sessions(server, REVOKED)
    await wait_until(
        lambda: server.running.components.revocations.sequence >= REVOKED, 10, "loaded"
    )
    reader = Watch.open(server.channel)
    await reader.until(lambda w: w.sequence >= REVOKED, within=10.0, what="the snapshot")
    snapshot_bytes = sum(u.ByteSize() for u in reader.updates)
    await reader.close()
    assert snapshot_bytes > 2_000_000  # the set is far larger than one update

    # No BDP probing: each client's receive window stays small, so nothing gets through.
    channel = grpc.aio.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls = [
            channel.unary_stream(
                WATCH_METHOD,
                request_serializer=auth_pb2.WatchRevocationsRequest.SerializeToString,
                response_deserializer=auth_pb2.RevocationUpdate.FromString,
            )(auth_pb2.WatchRevocationsRequest(after_sequence=after_sequence))
            for _ in range(NEVER_READING)
        ]
        await wait_until(lambda: hub.watchers == NEVER_READING, 10, "the watchers registered")
        await asyncio.sleep(1.0)  # every writer reaches its stuck write
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for call in calls:
            call.cancel()
        await channel.close()
    # A private copy per stream would be NEVER_READING * snapshot_bytes; one update each
    # (at most MAX_UPDATE_ENTRIES entries, a sixth of this set) is what is allowed.
    assert held < NEVER_READING * snapshot_bytes / 4, (
        f"{held} bytes held by {NEVER_READING} streams for a {snapshot_bytes}-byte set"
    )
    assert REVOKED > 4 * MAX_UPDATE_ENTRIES
    await wait_until(lambda: hub.watchers == 0, 10, "the streams closed")
    # The server serves on.
    assert (await server.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json


async def test_watchers_claiming_a_future_position_do_not_make_the_server_read_the_log(
    server_factory: ServerFactory,
) -> None:
    """An after_sequence past the log's head (2^64-1, or just past it) makes the stream wait
    briefly for this replica to get there; while the database's notifications are heard, that
    wait must not become a read of the log per stream (a loop of queries any client drives
    by reconnecting)."""
    server = await server_factory()
    feed = server.running.revocation_feed
    await wait_until(lambda: feed.listening.is_set(), 10, "listening")
    head = server.running.components.revocations.sequence
    stub = auth_pb2_grpc.AuthServiceStub(server.channel)
    reads_before = feed.catch_ups
    for after in [2**64 - 1, 2**63, head + 1, head + 2] * 8:
        call = stub.WatchRevocations(auth_pb2.WatchRevocationsRequest(after_sequence=after))
        await asyncio.sleep(0.05)
        call.cancel()
    # Reads of the log from other causes (a poll) may happen meanwhile; one per stream not.
    assert feed.catch_ups - reads_before <= 3
    # Such a stream still gets its snapshot once the wait is over.
    watch = Watch.open(server.channel, after_sequence=2**64 - 1)
    await watch.until(lambda w: w.sequence > 0, within=10.0, what="a snapshot")
    assert watch.updates[0].snapshot
    await watch.close()
