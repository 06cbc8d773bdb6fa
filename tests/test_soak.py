"""The short soak CI runs: `python -m service.loadtest.soak --duration 25 --workers 2`.

Its own server and embedded PostgreSQL, the mixed load, PostgreSQL restarted twice, a
worker killed, a reuse attack every second; four LocalValidator watchers (on the server and
on a second replica) cut off, restarted from scratch, their replicas' LISTEN connections
killed and the second replica restarted, while a revoker revokes sessions every way there
is; then the family invariants over the whole database, no revoked token answered valid by
a watcher past its bound, and every watcher holding exactly the database's revocations. The
soak's exit code is the verdict; its JSON proves each part really happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.system  # the soak: `python -m service.loadtest.soak` with faults

ROOT = Path(__file__).resolve().parent.parent
DURATION = 25
SOAK_TIMEOUT = 180  # seconds for the whole soak process


def _server_tracebacks(stderr: str, limit: int = 80) -> str:
    """The server's logged unexpected errors (what became INTERNAL), for the failure message."""
    lines = stderr.splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if "unexpected error" in line:
            picked += lines[i : i + 40]
    return "\n".join(picked[:limit])


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """Outside pytest's 0700 tmp_path, like tests/test_cli.py's world_traversable_dir."""
    path = Path(tempfile.mkdtemp(prefix="authsvc-soak-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(SOAK_TIMEOUT + 60)
def test_short_soak_survives_restarts_a_killed_worker_and_reuse_attacks_and_loses_no_revocation(
    scratch_dir: Path,
) -> None:
    report = scratch_dir / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.loadtest.soak",
            "--duration",
            str(DURATION),
            "--workers",
            "2",
            "--json",
            str(report),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SOAK_TIMEOUT,
        check=False,
    )
    assert report.exists(), f"no JSON report; stdout:\n{completed.stdout}\n{completed.stderr}"
    data: dict[str, Any] = json.loads(report.read_text())
    summary = completed.stdout + "\n" + _server_tracebacks(completed.stderr)
    assert data["failures"] == [], summary
    assert completed.returncode == 0, summary
    assert data["passed"] is True

    assert data["requests"] > 0, summary
    assert data["ok"] > 0, summary
    assert data["postgres_restarts"] == 2, summary
    assert data["workers_killed"] == 1, summary
    assert data["workers_replaced"] == 1, summary
    assert data["reuse_attacks"] >= 5, summary
    assert data["reuse_attacks_revoked"] == data["reuse_attacks"], summary
    assert data["attack_anomalies"] == [], summary
    assert data["attack_problems"] == [], summary
    assert data["invariant_violations"] == [], summary
    seen = set(data["errors"]) | set(data["attack_errors"])
    assert not seen & {"INTERNAL", "UNKNOWN"}, summary
    # The restarts really cut the database off from clients while the load ran.
    assert data["errors"].get("UNAVAILABLE", 0) + data["attack_errors"].get("UNAVAILABLE", 0) > 0
    for heading in ("requests", "req/s", "errors by code", "PostgreSQL restarts"):
        assert heading in completed.stdout

    # No loss: the watchers went through every kind of trouble and still agree with the
    # database, and none of them ever answered a revoked token valid past the bound.
    watch = data["watch"]
    assert watch["problems"] == [], summary
    assert watch["revoker_anomalies"] == [], summary
    assert watch["violations"] == [], summary
    assert watch["final_differences"] == [], summary
    for kind in (
        "refresh_token",
        "access_token",
        "session_id",
        "subject",
        "admin_revoke_session",
        "admin_disable_user",
        "reuse",
    ):
        assert watch["revocations"].get(kind, 0) > 0, (kind, summary)
    assert watch["watcher_disconnects"] > 0, summary
    assert watch["watcher_restarts"] > 0, summary
    assert watch["listener_kills"] > 0, summary
    assert watch["replica_restarts"] == 2, summary
    assert watch["checks"] > 0 and watch["answers"].get("REVOKED", 0) > 0, summary
    assert "VALID" not in watch["answers"], summary
    database = watch["database_final"]
    assert database["revoked_sessions"] > 0 and database["revoked_users"] > 0, summary
    assert len(watch["watchers_final"]) == watch["watchers"] == 4, summary
    for watcher in watch["watchers_final"]:
        assert watcher["fresh"] and watcher["sequence"] == database["head"], summary
        assert watcher["revoked_sessions"] == database["revoked_sessions"], summary
        assert watcher["revoked_users"] == database["revoked_users"], summary
    assert "watchers = database" in completed.stdout
