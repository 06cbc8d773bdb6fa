"""A worker killed with SIGKILL in the middle of refreshes: clients that got no answer
retry within the grace window and continue their chains, whether or not the dead worker
had committed their rotation (the retry then returns the very child it committed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.live_server import PASSWORD
from tests.test_cli import _server_env
from tests.test_faults import assert_family_invariants
from tests.test_replicas import _create_user, _server_process

pytestmark = pytest.mark.system  # `authsvc serve --workers 2` with a worker killed

CHAINS = 24
STEPS_AFTER_KILL = 3


async def test_refresh_retried_after_a_worker_dies_continues_the_chain(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(
        database_url,
        tmp_path,
        AUTH_REFRESH_REUSE_GRACE="30",
    )
    _create_user(env, "crash")
    with _server_process(env, workers=2) as (port, supervisor_pid):
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(CHAINS)
        ]
        stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in channels]
        credentials = auth_pb2.PasswordCredentials(username="crash", password=PASSWORD)
        pairs = [
            (await stub.Issue(auth_pb2.IssueRequest(password=credentials), timeout=20)).tokens
            for stub in stubs
        ]
        tokens = [p.refresh_token for p in pairs]
        db = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        assert db is not None
        unexpected: list[str] = []
        retries = 0
        committed_before_retry = 0
        killed = asyncio.Event()

        async def walk(i: int) -> None:
            nonlocal retries, committed_before_retry
            steps_after_kill = 0
            deadline = time.monotonic() + 60
            while steps_after_kill < STEPS_AFTER_KILL:
                assert time.monotonic() < deadline, "chain did not progress"
                try:
                    response = await stubs[i].Refresh(
                        auth_pb2.RefreshRequest(refresh_token=tokens[i]), timeout=10
                    )
                except grpc.aio.AioRpcError as error:
                    # Only a lost answer is acceptable (the connection to the dead worker
                    # reset); then retry the same parent. Anything the service itself
                    # answered (REUSED, INVALID, its own INTERNAL) is a failure.
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        unexpected.append(f"{error.code()}: {error.details()}")
                        return
                    retries += 1
                    used = await db.fetchval(
                        "SELECT used_at IS NOT NULL FROM refresh_tokens WHERE token_hash = $1",
                        hashlib.sha256(tokens[i].encode()).digest(),
                    )
                    committed_before_retry += bool(used)
                    await asyncio.sleep(0.05)
                    continue
                tokens[i] = response.tokens.refresh_token
                if killed.is_set():
                    steps_after_kill += 1

        async def kill_a_worker() -> None:
            await asyncio.sleep(0.5)
            victim = min(c.pid for c in psutil.Process(supervisor_pid).children())
            os.kill(victim, signal.SIGKILL)
            killed.set()

        try:
            await asyncio.gather(kill_a_worker(), *(walk(i) for i in range(CHAINS)))
            assert not unexpected, unexpected
            # Every chain's newest token is the one the database holds as live.
            for token in tokens:
                row = await db.fetchrow(
                    "SELECT used_at FROM refresh_tokens WHERE token_hash = $1",
                    hashlib.sha256(token.encode()).digest(),
                )
                assert row is not None and row["used_at"] is None
            live = await db.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NULL")
            assert live == CHAINS, "no chain may have been revoked as reuse"
            await assert_family_invariants(db)
        finally:
            await db.close()
            for channel in channels:
                await channel.close()
        print(f"retries: {retries}, of which after a committed rotation: {committed_before_retry}")
