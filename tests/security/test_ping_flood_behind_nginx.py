"""The deployment's nginx (deploy/nginx/authsvc.conf) in front of a worker keeps gRPC core's
PING flood off it (docs/security.md, "Known gaps in gRPC's C core"): ~100,000 PINGs on one
connection whose client then reads nothing keep a worker's core busy for seconds. HTTP/2
PINGs are per connection: nginx answers them itself and opens its own connections upstream.
Measured, not assumed: the same flood sent straight to the worker costs it CPU (so the
flood works in this setup), and through nginx it does not."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest

from service.loadtest.server_process import ServeCommand, serving
from tests.security.test_worker_memory import _frame, _jwks_answers
from tests.test_cli import _server_env
from tests.test_nginx import NEEDS_NGINX, nginx

pytestmark = [pytest.mark.system, pytest.mark.timeout(180), NEEDS_NGINX]

PINGS = 100_000
AFTER = 5.0
"""Seconds the flooding connection stays open, unread, after its last PING."""


def _cpu_seconds(process: psutil.Process) -> float:
    """User and system CPU of a process and its children (nginx's master and workers)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def _flood_and_stay(port: int, within: float = 10.0) -> int:
    """PINGs on one connection, a thousand to a write, until PINGS are sent, `within`
    seconds pass or the peer stops reading or closes; then the connection stays open,
    unread, for AFTER seconds. The PINGs sent."""
    batch = b"".join(_frame(6, 0, 0, i.to_bytes(8, "big")) for i in range(1000))
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        sock.settimeout(1)
        deadline = time.monotonic() + within
        while sent < PINGS and time.monotonic() < deadline:
            try:
                sock.sendall(batch)
            except OSError:  # it stopped reading (timeout) or closed the connection
                break
            sent += 1000
        time.sleep(AFTER)
    return sent


def test_nginx_in_front_keeps_the_ping_flood_off_the_worker(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(database_url, tmp_path)
    with serving(ServeCommand(env, workers=1), at_end="kill") as server:
        (worker,) = psutil.Process(server.process.pid).children()
        with nginx([server.target, server.target], tmp_path / "nginx") as front:
            front_process = psutil.Process(front.process.pid)
            worker_before, front_before = _cpu_seconds(worker), _cpu_seconds(front_process)
            through_nginx = _flood_and_stay(front.port)
            worker_cost = _cpu_seconds(worker) - worker_before
            front_cost = _cpu_seconds(front_process) - front_before
            assert _jwks_answers(front.port)
        # The same flood, straight to the worker.
        before = _cpu_seconds(worker)
        direct = _flood_and_stay(server.port)
        direct_cost = _cpu_seconds(worker) - before
    print(
        f"PINGs sent through nginx {through_nginx:,}: worker {worker_cost:.2f} s, nginx "
        f"{front_cost:.2f} s of CPU; straight to the worker {direct:,}: {direct_cost:.2f} s"
    )
    assert through_nginx >= 10_000, "nginx closed the connection at once: nothing was tested"
    assert worker_cost < 0.5, worker_cost
    assert front_cost < 2.0, front_cost
    assert direct_cost > worker_cost + 1.0, (worker_cost, direct_cost)
