"""Revocation across server processes: LISTEN/NOTIFY, reconnect and resync, workers.

Each server here is a real `authsvc serve` process on its own port, all on one
database; they share nothing but PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.loadtest.server_process import ServeCommand, serving
from tests.live_server import PASSWORD
from tests.test_cli import _authsvc, _server_env

pytestmark = pytest.mark.system  # `authsvc serve` processes as replicas

PROPAGATION_LIMIT = 1.0  # seconds: the contract for other replicas


@contextmanager
def _server_process(env: dict[str, str], workers: int = 1) -> Iterator[tuple[int, int]]:
    """An `authsvc serve` process; yields (port, pid) and stops it with SIGTERM after (it
    must exit with 0)."""
    with serving(ServeCommand(env, workers=workers), at_end="stop_cleanly") as server:
        yield server.port, server.pid


def _stub(port: int) -> tuple[grpc.Channel, auth_pb2_grpc.AuthServiceStub]:
    # A local subchannel pool gives every channel its own TCP connection (gRPC
    # otherwise shares one per target across the process).
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    return channel, auth_pb2_grpc.AuthServiceStub(channel)


def _login(stub: auth_pb2_grpc.AuthServiceStub, username: str) -> auth_pb2.TokenPair:
    credentials = auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
    response: auth_pb2.IssueResponse = stub.Issue(
        auth_pb2.IssueRequest(password=credentials), timeout=10
    )
    return response.tokens


def _verdict(stub: auth_pb2_grpc.AuthServiceStub, token: str) -> auth_pb2.ValidateResponse:
    response: auth_pb2.ValidateResponse = stub.Validate(
        auth_pb2.ValidateRequest(access_token=token), timeout=5
    )
    return response


def _seconds_until(condition: Callable[[], bool], limit: float) -> float:
    """How long until `condition()` holds; fails the test past `limit`."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < limit, f"not seen within {limit}s"
        time.sleep(0.02)
    return time.monotonic() - start


def _revoked_on(stub: auth_pb2_grpc.AuthServiceStub, token: str) -> Callable[[], bool]:
    return lambda: _verdict(stub, token).error == auth_pb2.VALIDATION_ERROR_REVOKED


def _create_user(env: dict[str, str], username: str) -> None:
    result = _authsvc(
        "users", "create", username, "--password-stdin", env=env, stdin=PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr


def _terminate_listeners(database_url: str) -> int:
    async def terminate() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                    WHERE application_name = 'authsvc-revocation-listener'
                      AND datname = current_database()"""
            )
        finally:
            await conn.close()
        return len(rows)

    return asyncio.run(terminate())


@pytest.fixture
def replica_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return _server_env(
        database_url,
        tmp_path,
        # The poll is the safety net; make it slow so these tests prove NOTIFY and resync.
        AUTH_REVOCATION_POLL_INTERVAL="60",
    )


def test_revocation_on_one_replica_is_seen_by_another_within_a_second(
    replica_env: dict[str, str], database_url: str
) -> None:
    _create_user(replica_env, "frank")
    with _server_process(replica_env) as (port_a, _), _server_process(replica_env) as (port_b, _):
        channel_a, a = _stub(port_a)
        channel_b, b = _stub(port_b)
        with channel_a, channel_b:
            pair = _login(a, "frank")
            assert _verdict(b, pair.access_token).valid  # signed on A, valid on B

            a.Revoke(auth_pb2.RevokeRequest(refresh_token=pair.refresh_token), timeout=5)
            # On the replica that revoked: at once.
            assert _verdict(a, pair.access_token).error == auth_pb2.VALIDATION_ERROR_REVOKED
            _seconds_until(_revoked_on(b, pair.access_token), PROPAGATION_LIMIT)

            # Kill every listener connection; revoke while they are (maybe) down.
            second = _login(a, "frank")
            assert _verdict(b, second.access_token).valid
            assert _terminate_listeners(database_url) == 2
            a.Revoke(auth_pb2.RevokeRequest(access_token=second.access_token), timeout=5)
            # B reconnects, LISTENs again and re-reads the window: nothing is lost.
            _seconds_until(_revoked_on(b, second.access_token), PROPAGATION_LIMIT + 1.0)

            # And after the reconnect, notifications flow again.
            time.sleep(0.5)
            third = _login(b, "frank")
            assert _verdict(a, third.access_token).valid
            b.Revoke(auth_pb2.RevokeRequest(refresh_token=third.refresh_token), timeout=5)
            _seconds_until(_revoked_on(a, third.access_token), PROPAGATION_LIMIT)


def test_logout_everywhere_and_disable_are_seen_across_processes(
    replica_env: dict[str, str],
) -> None:
    _create_user(replica_env, "grace")
    _create_user(replica_env, "heidi")
    with _server_process(replica_env) as (port_a, _), _server_process(replica_env) as (port_b, _):
        channel_a, a = _stub(port_a)
        channel_b, b = _stub(port_b)
        with channel_a, channel_b:
            sessions = [_login(a, "grace") for _ in range(3)]
            caller = sessions[0].access_token
            subject = _verdict(a, caller).subject
            response = a.Revoke(
                auth_pb2.RevokeRequest(subject=subject),
                metadata=(("authorization", f"Bearer {caller}"),),
                timeout=5,
            )
            assert response.revoked_sessions == 3
            for pair in sessions:
                _seconds_until(_revoked_on(b, pair.access_token), PROPAGATION_LIMIT)

            # Disabled from a third process (the CLI): both servers see it.
            heidi = _login(b, "heidi")
            disabled = _authsvc("users", "disable", "heidi", env=replica_env)
            assert disabled.returncode == 0, disabled.stderr
            _seconds_until(_revoked_on(a, heidi.access_token), PROPAGATION_LIMIT)
            _seconds_until(_revoked_on(b, heidi.access_token), PROPAGATION_LIMIT)


def _worker_pids(supervisor_pid: int) -> set[int]:
    return {child.pid for child in psutil.Process(supervisor_pid).children()}


def test_workers_share_one_port_and_survive_kill_9(replica_env: dict[str, str]) -> None:
    _create_user(replica_env, "ivan")
    with _server_process(replica_env, workers=2) as (port, supervisor_pid):
        workers = _worker_pids(supervisor_pid)
        assert len(workers) == 2

        # Connections land on both workers (SO_REUSEPORT spreads them): hold 20
        # open and look at which worker holds each server-side socket.
        channels = [_stub(port) for _ in range(20)]
        try:
            for _, stub in channels:
                stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
            serving = {
                pid
                for pid in workers
                for conn in psutil.Process(pid).net_connections(kind="tcp")
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
            }
        finally:
            for channel, _ in channels:
                channel.close()
        assert serving == workers

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            pids = _worker_pids(supervisor_pid)
            return victim not in pids and len(pids) == 2

        _seconds_until(replaced, 30)
        # Every call now succeeds: whichever worker takes the connection.
        for _ in range(20):
            channel, stub = _stub(port)
            with channel:
                pair = _login(stub, "ivan")
                assert _verdict(stub, pair.access_token).valid
