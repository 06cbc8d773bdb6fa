"""A stopping server stops accepting connections before it refuses its last calls: with a
worker beside it on the port (SO_REUSEPORT: a replacement, a sibling) new connections go
there instead of being taken only to have every call refused (UNAVAILABLE, SHUTTING_DOWN).
Found by tests/security/test_worker_memory.py[1-300] in CI: two probes, each trying three
new connections, met the refusing worker on all three."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.clock import ManualClock
from service.database import create_pool
from service.listening_sockets import listening_tcp_sockets, stop_accepting
from service.server import start_server
from service.settings import Settings

SIBLING = "sibling"
"""A health service name only the sibling server knows: its SERVING says who answered."""


def _reuse_port_listener(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def test_a_shut_down_listener_leaves_the_port_to_the_one_beside_it() -> None:
    first = _reuse_port_listener()
    port = first.getsockname()[1]
    second = _reuse_port_listener(port)
    with first, second:
        found = listening_tcp_sockets(port)
        assert len(found) == 2
        assert found <= listening_tcp_sockets()
        first_only = frozenset({os.fstat(first.fileno()).st_ino})
        assert first_only < found
        assert stop_accepting(first_only) == 1
        assert stop_accepting(first_only) == 1  # again: already shut down, no error
        assert listening_tcp_sockets(port) == found - first_only
        second.settimeout(2)
        for _ in range(20):  # hashed over the group: ~half would reach `first` before
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                accepted, _ = second.accept()
                accepted.close()
        first.setblocking(False)
        with pytest.raises(OSError, match="Invalid argument"):  # no longer listening
            first.accept()


def test_stop_accepting_leaves_other_sockets_alone() -> None:
    listener = _reuse_port_listener()
    with listener:
        assert stop_accepting(frozenset()) == 0
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


async def _sibling_answers(port: int) -> str:
    """Health Check of the sibling's name on a new connection: SERVING from the sibling,
    else the status the stopping server gave."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SIBLING), timeout=2
            )
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def test_a_stopping_server_sends_new_connections_to_the_worker_beside_it(
    settings: Settings, clock: ManualClock
) -> None:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, settings)
    running = await start_server(
        settings, dsn=settings.database_url, pool=pool, clock=clock, reuse_port=True
    )
    address = f"127.0.0.1:{running.port}"
    # A connection to the stopping server, made before the sibling listens: its calls
    # keep arriving, so it stays in its refusing phase (at most MAX_SHUTDOWN_QUIESCE).
    held = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    held_health = health_pb2_grpc.HealthStub(held)
    await held_health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    sibling = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    sibling_health = health_async.HealthServicer()
    await sibling_health.set(SIBLING, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(sibling_health, sibling)
    assert sibling.add_insecure_port(address) == running.port
    await sibling.start()
    stopping = asyncio.create_task(running.stop(4.0))  # quiesce: min(1 s, grace / 2)

    async def keep_arriving() -> None:
        while not stopping.done():
            # Refused (SHUTTING_DOWN) once closed: what keeps the phase going.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await held_health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            await asyncio.sleep(0.01)

    arriving = asyncio.create_task(keep_arriving())
    try:
        while not running.unary_budget.closed:  # noqa: ASYNC110  # the server's own flag
            await asyncio.sleep(0.005)
        answers = [await _sibling_answers(running.port) for _ in range(12)]
        refusals = running.unary_budget.refused_while_closed
        assert not stopping.done(), "stopped before the connections were tried"
        # Before: about half went to the stopping server, each refused (SHUTTING_DOWN).
        assert answers == ["SERVING"] * len(answers), answers
        assert refusals > 0  # the held connection's calls were still refused meanwhile
    finally:
        await stopping
        await arriving
        await held.close()
        await sibling.stop(None)
        await pool.close()
