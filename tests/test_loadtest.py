"""`authsvc load` end to end: a few seconds of each scenario against a real server, zero errors.

Speed is not asserted here (see `make bench`); only that the tool works and reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from argon2 import PasswordHasher as Argon2Hasher

from service.domain.passwords import make_argon2_hasher
from service.loadtest.baselines import argon2_rate
from service.loadtest.bench_page import RESULTS_END, RESULTS_START
from service.loadtest.stats import ProcessResult, percentile, summarize
from tests.test_cli import _authsvc, _env, _server_env
from tests.test_replicas import _server_process


def _run_load(env: dict[str, str], tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "load.json"
    result = _authsvc(
        "load",
        "--duration",
        "1.5",
        "--processes",
        "2",
        "--concurrency",
        "4",
        "--users",
        "4",
        "--json",
        str(out),
        *args,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "p99.9 ms" in result.stdout  # the table
    report = json.loads(out.read_text())
    (scenario,) = report["scenarios"]
    assert scenario["errors"] == {}
    assert scenario["ok"] > 0
    assert scenario["requests_per_second"] > 0
    return dict(scenario)


@pytest.mark.system
def test_make_load_path_starts_its_own_server(database_url: str, tmp_path: Path) -> None:
    env = _env(AUTH_DATABASE_URL=database_url)
    scenario = _run_load(env, tmp_path, "--scenario", "mixed", "--workers", "1")
    assert scenario["scenario"] == "mixed"


@pytest.mark.system
@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("--scenario", "health"), "health"),
        (("--scenario", "validate"), "validate-hot"),
        (("--scenario", "validate", "--tokens", "cold"), "validate-cold"),
        (("--scenario", "refresh"), "refresh"),
        (("--scenario", "issue"), "issue"),
        (("--scenario", "validate", "--rate", "200"), "validate-hot"),
    ],
)
def test_each_scenario_against_a_running_target(
    database_url: str, tmp_path: Path, args: tuple[str, ...], name: str
) -> None:
    env = _server_env(
        database_url,
        tmp_path,
    )
    with _server_process(env) as (port, _):
        scenario = _run_load(env, tmp_path, "--target", f"127.0.0.1:{port}", *args)
    assert scenario["scenario"] == name
    if "--rate" in args:
        # Open loop: about rate x duration requests were sent, whatever the latency.
        assert 150 <= int(str(scenario["ok"])) <= 350


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile([], 50) == 0.0


def test_summaries_merge_processes_exactly() -> None:
    a = ProcessResult(latencies=[0.001] * 90, elapsed=1.0)
    b = ProcessResult(latencies=[0.1] * 10, elapsed=1.0)
    b.errors["UNAVAILABLE"] = 5
    summary = summarize("x", [a, b], processes=2, concurrency=2, rate=None)
    assert summary.ok == 100
    assert summary.errors == {"UNAVAILABLE": 5}
    assert summary.requests_per_second == 105.0
    assert summary.latency_ms["p50"] == pytest.approx(1.0)
    assert summary.latency_ms["p99"] == pytest.approx(100.0)


@pytest.mark.system
@pytest.mark.timeout(400)  # the run's own limit is the subprocess's 360 s below
def test_bench_runs_end_to_end_and_prints_its_table(database_url: str, tmp_path: Path) -> None:
    """`make bench` in miniature (half-second runs): every row is there, with zero errors,
    and the figures section of a copy of docs/performance.md is rewritten with them."""
    out = tmp_path / "bench.md"
    page = tmp_path / "performance.md"
    original = (Path(__file__).resolve().parent.parent / "docs" / "performance.md").read_text()
    page.write_text(original)
    result = _authsvc(
        "bench",
        "--duration",
        "0.5",
        "--rounds",
        "1",
        "--concurrency",
        "4",
        "--workers",
        "1",
        "--output",
        str(out),
        "--write-docs",
        str(page),
        env=_env(AUTH_DATABASE_URL=database_url),
        # the freshness rows (200 revocations, 10 s of listener cuts, 500 logins) and the
        # LocalValidator tables (100k revocations, 1,000 streams)
        timeout=360,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = out.read_text()
    # The page: prose untouched, the section between the markers now this run's.
    written = page.read_text()
    start, end = written.index(RESULTS_START), written.index(RESULTS_END)
    assert written[:start] == original[: original.index(RESULTS_START)]
    assert written[end:] == original[original.index(RESULTS_END) :]
    section = written[start:end]
    assert "From an earlier" not in section
    command = (
        f"authsvc bench --duration 0.5 --rounds 1 --concurrency 4 --processes 2 --workers 1 "
        f"--write-docs {page}"
    )
    assert f"Written by `{command}` on " in section
    assert re.search(r"Machine: .+, \d+ cores; Python 3\.\d+\.\d+; PostgreSQL \d+", section)
    assert "| validate-hot |" in section and "| ES256 |" in section
    for row in (
        "| health |",
        "| validate-hot |",
        "| validate-cold |",
        "| validate-hot, metrics + service token |",
        "| refresh |",
        "| issue |",
        "| validate-hot+login |",
        "| sql rotation, one statement |",
        "composite 1/(1/H + 1/S)",
        "| LocalValidator hot (verified-token cache hit) |",
        "| LocalValidator cold (signature checked, ",
        "| signature (key lookup, low-s check, ES256 verify) |",
        "| server, 1,000 WatchRevocations streams (resuming at the head) |",
        "| LocalValidator process, holding 100k revoked sessions |",
        "argon2id-only",
        "memory: 100k",
        "| ES256 |",
        "| revocation to refusal on another replica, p99 | 200 |",
        "| … while its listener is cut, max (",
    ):
        assert row in table, row
    # The errors column of every load row (of the first table: 8 columns) is 0.
    for line in table.splitlines():
        if line.count("|") == 9 and line.startswith(
            ("| health", "| validate", "| sql", "| refresh |", "| issue |")
        ):
            assert line.split("|")[5].strip() == "0", line
    # Cost per operation: measured round trips (a refresh and a login reach the database,
    # a Validate does not) and CPU per call of the server, of PostgreSQL and of the load
    # generator's own processes.
    costs = {
        cells[1].strip(): [c.strip() for c in cells[2:6]]
        for line in table.splitlines()
        if line.startswith("| ") and len(cells := line.split("|")) == 7
    }
    # The counts tests/test_round_trips.py requires, measured through the server's pool.
    assert (costs["refresh"][0], costs["issue (login)"][0]) == ("1.0", "2.0")
    assert float(costs["validate-hot"][0]) == 0
    assert costs["sql rotation, one statement (asyncpg alone)"][0] == "1.0"
    for operation in ("refresh", "issue (login)", "validate-hot", "health (empty call)"):
        server_us, _postgres_us, load_us = (float(v.replace(",", "")) for v in costs[operation][1:])
        assert server_us > 0, operation
        assert load_us > 0, operation  # the client side of a call costs something too
    assert float(costs["refresh"][2].replace(",", "")) > 0  # PostgreSQL worked for it
    assert float(costs["sql rotation, one statement (asyncpg alone)"][3].replace(",", "")) > 0


def test_argon2_baseline_hashes_at_the_priority_of_the_servers_hashing_threads() -> None:
    """The bench's argon2id-only baseline runs each of its threads at the lowest priority,
    as the server's hashing threads do: the same work under the same scheduling."""
    niceness: list[int] = []
    real_verify = make_argon2_hasher().verify

    def verify_and_note(password_hash: str, password: str) -> bool:
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_verify(password_hash, password)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Argon2Hasher, "verify", lambda _self, h, p: verify_and_note(h, p))
        assert argon2_rate(threads=2, duration=0.05) > 0
    assert niceness
    assert set(niceness) == {19}


def _serve_processes_of(load: psutil.Process) -> list[psutil.Process]:
    """The `serve` supervisor `load` started (first), then its workers."""
    found = [p for p in load.children(recursive=True) if "serve" in p.cmdline()]
    return sorted(found, key=lambda p: "--worker" in p.cmdline())


def _postgres_of(data_dir: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "postgres" and data_dir in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.system
@pytest.mark.timeout(180)
def test_a_killed_load_run_leaves_no_server_behind(tmp_path: Path) -> None:
    """SIGKILL to `authsvc load` (as a timeout kills it) ends the server it started, with
    its embedded PostgreSQL, and its load processes: they stayed behind (the server and its
    database until killed by hand, the load processes calling a dead server until the
    run's duration had passed)."""
    out = tmp_path / "load.out"
    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "load",
            "--duration",
            "120",
            "--workers",
            "1",
            "--processes",
            "1",
            "--concurrency",
            "2",
            "--users",
            "2",
            "--scenario",
            "health",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=out.open("w"),  # its progress lines
    )
    servers: list[psutil.Process] = []
    postgres: list[psutil.Process] = []
    load_processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while "requests" not in out.read_text():  # measuring: the server has started
            assert load.poll() is None, "the load run ended early"
            assert time.monotonic() < deadline, "the load run started no server"
            time.sleep(0.5)
        servers = _serve_processes_of(psutil.Process(load.pid))
        assert len(servers) == 2, servers  # the supervisor, its worker
        postgres = _postgres_of(servers[0].environ()["AUTH_DATA_DIR"])
        assert postgres, "precondition: the server's embedded PostgreSQL"
        load_processes = [p for p in psutil.Process(load.pid).children() if p not in servers]
        assert load_processes, "precondition: the load processes"
        load.kill()
        load.wait()
        _, alive = psutil.wait_procs([*servers, *postgres, *load_processes], timeout=30)
        assert not alive, f"left running after the load run was killed: {alive}"
    finally:
        if load.poll() is None:
            load.kill()
        # A failed run must not leave them running.
        for process in [*servers, *postgres, *load_processes]:
            with contextlib.suppress(psutil.Error):
                process.kill()
