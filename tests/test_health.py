"""grpc.health.v1 as a load balancer and an operator see it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import validate
from tests.live_server import LiveServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(server: LiveServer, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _until(server: LiveServer, service: str, wanted: int, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while await _status(server, service) != wanted:
        assert time.monotonic() < deadline, f"{service!r} never became {wanted}"
        await asyncio.sleep(0.05)


async def test_revocation_health_follows_the_listener(
    server: LiveServer, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await server.create_user("watcher")
    pair = await server.login("watcher")
    await _until(server, "authsvc.revocations", SERVING)

    # Keep the listener from coming back (it connects with asyncpg.connect, outside the
    # pool), then cut its connection.
    admin = await asyncpg.connect(database_url)
    real_connect = asyncpg.connect

    async def refused(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        raise OSError("connection refused (test)")

    monkeypatch.setattr(asyncpg, "connect", refused)
    try:
        await admin.execute(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                WHERE application_name = 'authsvc-revocation-listener'
                  AND datname = current_database()"""
        )
    finally:
        await admin.close()
    await _until(server, "authsvc.revocations", NOT_SERVING)
    # The service as a whole still serves: Validate answers from memory.
    assert await _status(server, "") == SERVING
    assert await _status(server, "auth.v1.AuthService") == SERVING
    assert (await validate(server, pair.access_token)).valid

    monkeypatch.setattr(asyncpg, "connect", real_connect)
    await _until(server, "authsvc.revocations", SERVING)


async def test_stopping_reports_not_serving(server: LiveServer) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="auth.v1.AuthService"))
    first = await watch.read()
    assert first.status == SERVING
    stopping = asyncio.create_task(server.running.stop(2.0))
    update = await asyncio.wait_for(watch.read(), timeout=5)
    assert update.status == NOT_SERVING
    await stopping


async def test_list_names_every_health_service_and_start_up_logs_no_error(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Health `List` is served (grpcio-health-checking's aio servicer leaves it a
    synchronous UNIMPLEMENTED, which the call budget refused with an ERROR line at start)."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert reply.statuses[""].status == SERVING
    assert reply.statuses["auth.v1.AuthService"].status == SERVING
    assert "authsvc.settings" in reply.statuses
    for name, listed in reply.statuses.items():
        assert await _status(server, name) == listed.status
    assert not [r for r in caplog.records if "has no async handler" in r.getMessage()]
