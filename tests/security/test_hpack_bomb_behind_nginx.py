"""The deployment's nginx (deploy/nginx/authsvc.conf) in front of a worker stops gRPC core's
HPACK decompression bomb (docs/security.md, "Known gaps in gRPC's C core"): nginx decodes
the header block itself, within its own limits, and opens its own connections upstream.
Measured, not assumed: the same bomb sent straight to the worker grows it (so the bomb works
in this setup), and through nginx it does not."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from service.loadtest.server_process import ServeCommand, serving
from tests.security.test_worker_memory import _bomb, _jwks_answers, _workers
from tests.test_cli import _server_env
from tests.test_nginx import NEEDS_NGINX, nginx

pytestmark = [pytest.mark.system, pytest.mark.timeout(180), NEEDS_NGINX]


def _resident_mib(process: psutil.Process) -> int:
    """Of a process and its children (nginx's master and workers)."""
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) // (
        1024 * 1024
    )


def test_nginx_in_front_stops_the_hpack_bomb(database_url: str, tmp_path: Path) -> None:
    # No memory ceiling: what the bomb does to the worker is seen whole.
    env = _server_env(database_url, tmp_path, AUTH_WORKER_MAX_MEMORY="0")
    with serving(ServeCommand(env, workers=1), at_end="kill") as server:
        # The shipped file names two replicas: both are this one.
        with nginx([server.target, server.target], tmp_path / "nginx") as front:
            (worker,) = _workers(server.process.pid).values()
            front_before = _resident_mib(psutil.Process(front.process.pid))
            sent = _bomb(front.port, 5, threading.Event(), 1000)
            time.sleep(1)
            (through_nginx,) = _workers(server.process.pid).values()
            front_after = _resident_mib(psutil.Process(front.process.pid))
            assert _jwks_answers(front.port)
            assert sent > 3000, "nginx closed the connection early: the bomb was not sent"
            assert through_nginx < worker + 50, (worker, through_nginx)
            assert front_after < front_before + 50, (front_before, front_after)
        # The same bomb, straight to the worker, for less time.
        _bomb(server.port, 2, threading.Event(), 1000)
        time.sleep(1)
        (direct,) = _workers(server.process.pid).values()
        assert direct > through_nginx + 200, (through_nginx, direct)
