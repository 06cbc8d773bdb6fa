"""A stopping server ends its WatchRevocations streams itself once its drain is over, with
UNAVAILABLE / SHUTTING_DOWN (what a verifier retries, on another replica), instead of
holding them, and its own stop, for the whole grace until gRPC cancels them ("Cancelling
all calls"). Found by an outside-in review (2026-12-02): with one watcher open every stop
took all of AUTH_SHUTDOWN_GRACE, and a lone worker's port had no listener meanwhile."""

from __future__ import annotations

import asyncio
import time

import grpc
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.clock import ManualClock
from service.settings import Settings
from tests.helpers import assert_error
from tests.live_server import SecretsSeen, start_live_server
from tests.watching import Watch

GRACE = 20.0


async def test_a_stop_ends_the_watch_streams_with_shutting_down_and_does_not_wait_the_grace(
    settings: Settings, clock: ManualClock, secrets_seen: SecretsSeen
) -> None:
    live = await start_live_server(settings, clock, secrets_seen)
    try:
        watches = [Watch.open(live.channel) for _ in range(3)]
        for watch in watches:
            await watch.until(lambda w: w.sequence > 0 or bool(w.updates), what="the snapshot")
        started = time.monotonic()
        await live.running.stop(GRACE, drain=0.2)
        took = time.monotonic() - started
        for watch in watches:
            assert watch._task is not None
            await asyncio.wait_for(watch._task, 5)
            assert watch.error is not None
            assert_error(watch.error, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        # The drain and the unary calls' quiet (at most 1 s) and gRPC's stop: not the grace,
        # which the streams held it for before (the whole 20 s).
        assert took < GRACE / 4, took
    finally:
        await live.channel.close()
        await live.pool.close()


async def test_a_watch_opened_after_the_streams_ended_is_refused_with_shutting_down(
    settings: Settings, clock: ManualClock, secrets_seen: SecretsSeen
) -> None:
    live = await start_live_server(settings, clock, secrets_seen)
    try:
        await live.stub.GetJwks(auth_pb2.GetJwksRequest())  # connected before the stop
        # A call in progress keeps the server in its refusing phase a while.
        live.running.unary_budget.enter()
        stopping = asyncio.create_task(live.running.stop(GRACE, drain=0.0))
        while not live.running.unary_budget.closed:  # noqa: ASYNC110  # the server's own flag
            await asyncio.sleep(0.005)
        call = auth_pb2_grpc.AuthServiceStub(live.channel).WatchRevocations(
            auth_pb2.WatchRevocationsRequest()
        )
        try:
            async for _ in call:
                raise AssertionError("a stream opened while stopping got an update")
        except grpc.aio.AioRpcError as error:
            assert_error(error, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        live.running.unary_budget.leave()
        await stopping
    finally:
        await live.channel.close()
        await live.pool.close()
