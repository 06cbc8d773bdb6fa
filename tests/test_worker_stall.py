"""A worker whose event loop stops turning (here: SIGSTOP; in life a deadlock or a pinned
loop) is found by its silence and replaced: the kernel still hands it new connections
(SO_REUSEPORT), whose calls would hang. Found by an outside review: with one of two workers
stopped, 12 of 20 calls on new connections timed out, and the supervisor kept it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.loadtest.server_process import ServeCommand, serving
from tests.test_cli import _server_env

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


def _workers(supervisor: int) -> set[int]:
    return {child.pid for child in psutil.Process(supervisor).children()}


def test_a_stopped_worker_is_killed_and_replaced(database_url: str, tmp_path: Path) -> None:
    env = _server_env(database_url, tmp_path)
    log = tmp_path / "serve.log"
    with serving(ServeCommand(env, workers=2, stderr=log), at_end="kill") as server:
        before = _workers(server.process.pid)
        assert len(before) == 2
        stopped = min(before)
        os.kill(stopped, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while stopped in _workers(server.process.pid) or len(_workers(server.process.pid)) < 2:
                assert time.monotonic() < deadline, "the stopped worker was kept"
                time.sleep(0.2)
        finally:
            if psutil.pid_exists(stopped):
                os.kill(stopped, signal.SIGCONT)
        assert "sent no heartbeat for" in log.read_text()
        # The replacement is ready once it answers; then every new connection is served.
        deadline = time.monotonic() + 30
        answered = 0
        while answered < 20:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                try:
                    auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
                        auth_pb2.GetJwksRequest(), timeout=2
                    )
                    answered += 1
                except grpc.RpcError:
                    assert answered == 0, "a call failed after the replacement answered"
                    assert time.monotonic() < deadline, "the replacement never answered"
