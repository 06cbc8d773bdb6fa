"""Multiprocess mode: what two worker processes record is summed (or max'ed, min'ed) by a
collector in another process, as the `--workers` supervisor serves it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import (
    MULTIPROC_DIR_VARIABLE,
    MetricsEndpoint,
    multiprocess_enabled,
    multiprocess_registry,
    prepare_multiprocess_dir,
    worker_exited,
)
from tests.test_metrics_unit import fetch

REPO = Path(__file__).resolve().parent.parent
VALIDATE = "/auth.v1.AuthService/Validate"
CALLS_PER_WORKER = 250

# What a worker does, in a fresh interpreter that sees PROMETHEUS_MULTIPROC_DIR before
# anything imports prometheus_client. Worker i: listener up only in worker 0, i+1
# connections in use, lag 0.1*(i+1), 5+i revoked sessions.
WORKER = """
import os, sys
import grpc
from service.metrics import PrometheusTelemetry, ProcessSample, multiprocess_enabled

assert multiprocess_enabled(), "values would stay in this process"
calls, index = int(sys.argv[1]), int(sys.argv[2])  # and sys.argv[3]: the method
telemetry = PrometheusTelemetry()
validate = telemetry.rpc(sys.argv[3])
for _ in range(calls):
    validate.finished(grpc.StatusCode.OK, 0.002)
validate.finished(grpc.StatusCode.UNAUTHENTICATED, 0.3)
telemetry.login("failed")
telemetry.sessions_revoked("subject", 2)
telemetry.record_sample(ProcessSample(
    cache_hits=10 * (index + 1),
    cache_misses=index + 1,
    revoked_sessions=5 + index,
    revocation_lag_seconds=0.1 * (index + 1),
    revocation_listener_up=index == 0,
    pool_in_use=index + 1,
    pool_idle=2,
    pool_max=10,
))
print(os.getpid())
"""


async def run_worker(directory: Path, index: int) -> int:
    env = dict(os.environ)
    env[MULTIPROC_DIR_VARIABLE] = str(directory)
    env["PYTHONPATH"] = str(REPO)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        str(CALLS_PER_WORKER),
        str(index),
        VALIDATE,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return int(out.decode().strip())


def test_prepare_multiprocess_dir_removes_stale_files_only(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    assert prepare_multiprocess_dir(directory) == directory.resolve()
    assert directory.is_dir()
    (directory / "counter_12345.db").write_bytes(b"left by the previous run")
    (directory / "notes.txt").write_text("not ours")
    prepare_multiprocess_dir(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


@pytest.mark.system
async def test_two_workers_add_up_in_the_supervisor(tmp_path: Path) -> None:
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    # A stale file from a previous run would be summed in (or fail to parse) if kept.
    (directory / "counter_1.db").write_bytes(b"\0" * 16)
    prepare_multiprocess_dir(directory)
    # This process chose in-memory values when it imported prometheus_client; reading
    # the workers' files must not depend on that (the supervisor is in the same spot).
    assert MULTIPROC_DIR_VARIABLE not in os.environ
    assert not multiprocess_enabled()

    pids = await asyncio.gather(run_worker(directory, 0), run_worker(directory, 1))
    assert len(set(pids)) == 2
    registry = multiprocess_registry(directory)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # Counters and histograms: summed over workers.
    assert value("authsvc_rpc_calls_total", method=VALIDATE, code="OK") == 2 * CALLS_PER_WORKER
    assert value("authsvc_rpc_calls_total", method=VALIDATE, code="UNAUTHENTICATED") == 2.0
    count = 2 * CALLS_PER_WORKER + 2
    assert value("authsvc_rpc_duration_seconds_count", method=VALIDATE) == count
    # Cumulative buckets across workers: 2 ms calls under 2.5 ms, the 0.3 s ones above.
    assert value("authsvc_rpc_duration_seconds_bucket", method=VALIDATE, le="0.0025") == (
        2 * CALLS_PER_WORKER
    )
    assert value("authsvc_rpc_duration_seconds_bucket", method=VALIDATE, le="+Inf") == count
    assert value("authsvc_logins_total", outcome="failed") == 2.0
    assert value("authsvc_logins_total", outcome="succeeded") == 0.0
    assert value("authsvc_sessions_revoked_total", target="subject") == 4.0
    assert value("authsvc_token_cache_hits_total") == 30.0
    assert value("authsvc_token_cache_misses_total") == 3.0
    # Gauges: pool sizes summed, the worst lag and set size, listening only if all are.
    assert value("authsvc_db_pool_connections", state="in_use") == 3.0
    assert value("authsvc_db_pool_connections", state="idle") == 4.0
    assert value("authsvc_db_pool_max_connections") == 20.0
    assert value("authsvc_revocation_lag_seconds") == pytest.approx(0.2)
    assert value("authsvc_revoked_sessions") == 6.0
    assert value("authsvc_revocation_listener_up") == 0.0

    # The same totals over HTTP, as Prometheus scrapes the supervisor.
    endpoint = MetricsEndpoint.start("127.0.0.1:0", registry)
    try:
        _, _, text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{endpoint.port}/metrics")
    finally:
        endpoint.close()
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok_key = (("code", "OK"), ("method", VALIDATE))
    assert scraped[("authsvc_rpc_calls_total", ok_key)] == 2 * CALLS_PER_WORKER
    assert scraped[("authsvc_db_pool_connections", (("state", "in_use"),))] == 3.0

    # Worker 1 (the one not listening) exits: its gauges leave, its counts stay.
    worker_exited(pids[1], directory)
    assert value("authsvc_db_pool_connections", state="in_use") == 1.0
    assert value("authsvc_db_pool_max_connections") == 10.0
    assert value("authsvc_revocation_listener_up") == 1.0
    assert value("authsvc_revocation_lag_seconds") == pytest.approx(0.1)
    assert value("authsvc_rpc_calls_total", method=VALIDATE, code="OK") == 2 * CALLS_PER_WORKER
    assert value("authsvc_token_cache_hits_total") == 30.0


# A worker that has read the database's clock: argv[1] is its skew.
SKEW_WORKER = """
import os, sys
from service.metrics import PrometheusTelemetry, ProcessSample, multiprocess_enabled

assert multiprocess_enabled()
PrometheusTelemetry().record_sample(ProcessSample(
    cache_hits=0, cache_misses=0, revoked_sessions=0, revocation_lag_seconds=None,
    revocation_listener_up=True, pool_in_use=0, pool_idle=0, pool_max=1,
    clock_skew_seconds=float(sys.argv[1]),
))
print(os.getpid())
"""


async def _run_skew_worker(directory: Path, skew: float) -> int:
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: str(directory), "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SKEW_WORKER,
        str(skew),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return int(out.decode().strip())


@pytest.mark.system
async def test_a_clock_behind_is_not_hidden_by_another_workers_reading(tmp_path: Path) -> None:
    """The skew is signed: the max over workers showed one worker's +0.2 and hid the other's
    -45 (a host clock fallen behind), and `abs(...) > 1` never fired. Each live worker's
    reading is its own series (label `pid`), so every one of them is seen."""
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    ahead = await _run_skew_worker(directory, 0.2)
    behind = await _run_skew_worker(directory, -45.0)
    registry = multiprocess_registry(directory)
    samples = {
        sample.labels.get("pid"): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "authsvc_clock_skew_seconds"
    }
    assert samples == {str(ahead): 0.2, str(behind): -45.0}
    worker_exited(behind, directory)
    assert registry.get_sample_value("authsvc_clock_skew_seconds", {"pid": str(behind)}) is None
    assert registry.get_sample_value("authsvc_clock_skew_seconds", {"pid": str(ahead)}) == 0.2
