"""SIGTERM under load: calls in flight finish, calls that come after the drain are refused
with UNAVAILABLE (what clients retry, elsewhere), not ended CANCELLED by gRPC's stop
(outside-in review: 19 of ~4,700 calls were, the grace period not exceeded)."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
from pathlib import Path

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.loadtest.server_process import ServeCommand, serving
from tests.live_server import PASSWORD
from tests.test_cli import _server_env
from tests.test_replicas import _create_user

pytestmark = pytest.mark.system


async def _load_through_sigterm(
    target: str, process_pid: int, process_done: asyncio.Future[None], *, loops: int
) -> collections.Counter[str]:
    """`loops` Validate loops over 8 connections (no retries: raw statuses); SIGTERM
    after a second; the loops run on until the server has exited. The codes seen."""
    codes: collections.Counter[str] = collections.Counter()
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    try:
        stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in channels]
        issued = await stubs[0].Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username="carol", password=PASSWORD)
            ),
            timeout=10,
        )
        request = auth_pb2.ValidateRequest(access_token=issued.tokens.access_token)

        async def loop(stub: auth_pb2_grpc.AuthServiceStub) -> None:
            refused_in_a_row = 0
            while not process_done.done():
                try:
                    await stub.Validate(request, timeout=10)  # type: ignore[misc]
                    codes["OK"] += 1
                    refused_in_a_row = 0
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    # As a client with the documented retry policy does before retrying
                    # (RetryPolicy: 0.1 s, doubling, jittered): UNAVAILABLE is answered
                    # at once, and a client that retries without a pause overloads anyone.
                    refused_in_a_row += 1
                    await asyncio.sleep(random.uniform(0, min(1.0, 0.1 * 2**refused_in_a_row)))

        tasks = [asyncio.create_task(loop(stubs[i % len(stubs)])) for i in range(loops)]
        await asyncio.sleep(1.0)
        os.kill(process_pid, signal.SIGTERM)
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    return codes


async def test_sigterm_under_load_refuses_new_calls_with_unavailable_not_cancelled(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(database_url, tmp_path, AUTH_WORKERS="1", AUTH_SHUTDOWN_GRACE="5")
    _create_user(env, "carol")
    with serving(ServeCommand(env), at_end="stop") as server:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        async def watch_exit() -> int:
            code = await asyncio.to_thread(server.process.wait, 30)
            done.set_result(None)
            return code

        exited = asyncio.create_task(watch_exit())
        codes = await _load_through_sigterm(server.target, server.process.pid, done, loops=64)
        assert await exited == 0
    assert codes["OK"] > 100, codes
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    # Before the refusals every loop's call waiting in gRPC when its stop began ended
    # CANCELLED (62 of 64 loops, every run). Left: a call that reaches the connection in
    # the round trip of gRPC's own GOAWAY (about 1 run in 7 sees one); gRPC ends it with
    # CANCELLED (grpc/grpc#41785), nothing before its stop can refuse it.
    assert codes["CANCELLED"] <= 2, codes
