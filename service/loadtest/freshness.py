"""Freshness: from the moment Revoke returns on one replica, how long until a
`LocalValidator` following ANOTHER replica refuses the token.

Two `authsvc serve` replicas (A and B, one worker each) on one PostgreSQL; sessions logged
in beforehand; a LocalValidator follows B's WatchRevocations. For each session: Revoke on
A, note when the call returned, then ask the validator (`validate(token)`, no I/O) every
`POLL_SECONDS` until it answers REVOKED; the delay is the difference.

- Steady: `revocations` of them, one after another (after `WARM_UP` not counted).
- Listener cut: for `cut_seconds`, B's LISTEN connection (application_name
  `LISTENER_APPLICATION_NAME`, told from A's by A's being there before B started) is ended
  with `pg_terminate_backend` every 200-500 ms, while revocations go on at random spacing,
  so they land at every point of B's reconnect.

`python -m service.loadtest.freshness` runs it alone; `authsvc bench` adds its table.
Targets (issue 10): p99 <= 100 ms steady over >= 200 revocations, max <= 1 s while cut.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import asyncpg
from authsvc_client.client import AuthClient
from authsvc_client.local_validator import LocalValidator

from service.loadtest.bench_page import BenchReport
from service.loadtest.local import local_server_process, seed_users
from service.loadtest.stats import percentile
from service.setting_parsers import HOUR, bounded_argument, count, duration
from service.store.revocation_feed import LISTENER_APPLICATION_NAME

POLL_SECONDS = 0.0005
"""How often the validator is asked (the event loop rounds it up to about 1 ms)."""
GIVE_UP_SECONDS = 10.0
"""A token not refused by then is recorded with this delay (and counted as not refused)."""
WARM_UP = 5
"""Revocations made first and not counted (connections and code paths warm up)."""
SESSIONS_PER_USER = 50
"""Under the default session cap (100), so no login evicts a session still to be revoked."""
LOGIN_CONCURRENCY = 4
STEADY_TARGET_MS = 100.0
CUT_TARGET_MS = 1000.0
NEAR_CUT_SECONDS = 0.3
"""A revocation returning this soon after a cut counts as made while B reconnects."""

REVOCATIONS = count(1, 100_000)
CUT_SECONDS = duration(1.0, HOUR, zero="skip the listener-cut phase")

# This database's revocation listeners only (freshness, the watch soak, the tests that cut
# them): a cluster shared with other databases (AUTH_DATABASE_URL) holds their services'
# listeners too. $1: LISTENER_APPLICATION_NAME; $2 (the cut only): the pids to spare.
LISTENERS_SQL = """SELECT pid FROM pg_stat_activity
  WHERE application_name = $1 AND datname = current_database()"""
CUT_LISTENERS_SQL = """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()
   AND NOT pid = ANY($2::int[])"""


@dataclass(frozen=True)
class FreshnessOptions:
    revocations: int = 200
    """Counted revocations of the steady phase."""
    cut_seconds: float = 10.0
    """Length of the listener-cut phase (0: none)."""
    cut_every: tuple[float, float] = (0.2, 0.5)
    """Seconds between cuts, drawn uniformly from this range."""
    cut_pause: float = 0.05
    """Longest random pause between revocations of the cut phase."""
    cut_sessions: int = 300
    """Sessions logged in for the cut phase (it ends early if they run out)."""


@dataclass(frozen=True)
class Delays:
    """Revoke-returned to refused, in seconds, ascending."""

    seconds: list[float]
    not_refused: int = 0

    @property
    def count(self) -> int:
        return len(self.seconds)

    def ms(self, p: float) -> float:
        return percentile(self.seconds, p) * 1000

    @property
    def max_ms(self) -> float:
        return (self.seconds[-1] if self.seconds else 0.0) * 1000


@dataclass
class FreshnessResult:
    options: FreshnessOptions
    steady: Delays = field(default_factory=lambda: Delays([]))
    cut: Delays = field(default_factory=lambda: Delays([]))
    listener_cuts: int = 0
    """pg_terminate_backend calls that ended a listener of B."""
    near_cut: int = 0
    """Cut-phase revocations that returned within NEAR_CUT_SECONDS after a cut."""
    cut_phase_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        steady_ok = (
            self.steady.count >= 200
            and self.steady.ms(99) <= STEADY_TARGET_MS
            and not self.steady.not_refused
        )
        cut_ok = self.cut.max_ms <= CUT_TARGET_MS and not self.cut.not_refused
        return steady_ok and (self.options.cut_seconds == 0 or cut_ok)

    def table(self) -> str:
        """Markdown, for the bench page."""
        s, c = self.steady, self.cut
        return "\n".join(
            [
                "| freshness (Revoke on A → LocalValidator on B refuses) | revocations "
                "| p50 ms | p99 ms | max ms | target |",
                "|---|---:|---:|---:|---:|---|",
                f"| revocation to refusal on another replica, p99 | {s.count} | "
                f"{s.ms(50):.1f} | {s.ms(99):.1f} | {s.max_ms:.1f} | p99 ≤ 100 ms over ≥ 200 |",
                f"| … while its listener is cut, max ({self.listener_cuts} cuts in "
                f"{self.cut_phase_seconds:.0f} s, {self.near_cut} revocations within "
                f"{NEAR_CUT_SECONDS * 1000:.0f} ms after one) | {c.count} | {c.ms(50):.1f} | "
                f"{c.ms(99):.1f} | {c.max_ms:.1f} | max ≤ 1 s |",
            ]
        )

    def as_json(self) -> dict[str, object]:
        def delays(d: Delays) -> dict[str, object]:
            return {
                "revocations": d.count,
                "not_refused": d.not_refused,
                "p50_ms": d.ms(50),
                "p99_ms": d.ms(99),
                "max_ms": d.max_ms,
            }

        return {
            "passed": self.passed,
            "options": asdict(self.options),
            "steady": delays(self.steady),
            "listener_cut": {
                **delays(self.cut),
                "cuts": self.listener_cuts,
                "near_cut": self.near_cut,
                "seconds": self.cut_phase_seconds,
            },
        }


def setup_line(options: FreshnessOptions) -> str:
    return (
        f"freshness: two replicas (1 worker each) on one PostgreSQL, a LocalValidator on B "
        f"asked every {POLL_SECONDS * 1000:g} ms after Revoke on A returned "
        f"({WARM_UP} warm-up revocations not counted); listener cut every "
        f"{options.cut_every[0]:g}-{options.cut_every[1]:g} s for up to {options.cut_seconds:g} s "
        f"({options.cut_sessions} sessions)"
    )


def run_freshness(
    options: FreshnessOptions, extra_env: dict[str, str] | None = None
) -> FreshnessResult:
    """Start A and B (on AUTH_DATABASE_URL, else A's embedded PostgreSQL) and measure."""
    env = dict(extra_env or {})
    if not (env.get("AUTH_KEK") or os.environ.get("AUTH_KEK")):
        env["AUTH_KEK"] = base64.b64encode(secrets.token_bytes(32)).decode()  # one for both
    with local_server_process(workers=1, extra_env=env) as a:
        dsn = a.settings.database_url
        assert dsn is not None
        per_user = max(1, min(SESSIONS_PER_USER, a.settings.max_sessions_per_user))
        cut_sessions = options.cut_sessions if options.cut_seconds > 0 else 0
        sessions = WARM_UP + options.revocations + cut_sessions
        usernames, password = seed_users(a.settings, math.ceil(sessions / per_user))
        a_listeners = asyncio.run(_wait_for_listeners(dsn, ()))
        b_env = {
            **env,
            "AUTH_DATABASE_URL": dsn,
            # A replica refuses to start on settings that differ from those recorded.
            "AUTH_MAX_SESSIONS_PER_USER": str(a.settings.max_sessions_per_user),
        }
        with local_server_process(workers=1, extra_env=b_env) as b:
            asyncio.run(_wait_for_listeners(dsn, a_listeners))
            logins = [(usernames[i // per_user], password) for i in range(sessions)]
            return asyncio.run(_measure(options, a.target, b.target, dsn, a_listeners, logins))


async def _wait_for_listeners(
    dsn: str, known: tuple[int, ...], within: float = 60.0
) -> tuple[int, ...]:
    """The pids of listener backends other than `known`, once there is one."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within
        while True:
            pids = tuple(
                r["pid"] for r in await conn.fetch(LISTENERS_SQL, LISTENER_APPLICATION_NAME)
            )
            new = tuple(p for p in pids if p not in known)
            if new:
                return new
            if time.monotonic() > deadline:
                raise RuntimeError("the replica's revocation listener never connected")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def _measure(
    options: FreshnessOptions,
    target_a: str,
    target_b: str,
    dsn: str,
    a_listeners: tuple[int, ...],
    logins: list[tuple[str, str]],
) -> FreshnessResult:
    result = FreshnessResult(options)
    async with AuthClient(target=target_a) as on_a, AuthClient(target=target_b) as on_b:
        tokens = await _log_in(logins, (on_a, on_b))
        validator = LocalValidator(target_b)
        await validator.start(timeout=30)
        try:
            warm_up, tokens = tokens[:WARM_UP], tokens[WARM_UP:]
            for token in warm_up:
                await _revocation_delay(on_a, validator, token)
            steady, tokens = tokens[: options.revocations], tokens[options.revocations :]
            result.steady = _delays([await _revocation_delay(on_a, validator, t) for t in steady])
            if options.cut_seconds > 0:
                await _cut_phase(options, result, on_a, validator, tokens, dsn, a_listeners)
        finally:
            await validator.close()
    return result


async def _log_in(logins: list[tuple[str, str]], clients: tuple[AuthClient, ...]) -> list[str]:
    tokens: list[str] = [""] * len(logins)
    next_login = iter(range(len(logins)))

    async def worker(client: AuthClient) -> None:
        for i in next_login:
            username, password = logins[i]
            tokens[i] = (await client.issue(username, password, timeout=30)).access_token

    await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(LOGIN_CONCURRENCY)))
    return tokens


@dataclass(frozen=True)
class _Sample:
    returned_at: float
    """perf_counter() when Revoke returned."""
    delay: float
    refused: bool


async def _revocation_delay(on_a: AuthClient, validator: LocalValidator, token: str) -> _Sample:
    """Revoke `token` on A; seconds from the call's return until `validator` refuses it
    (GIVE_UP_SECONDS and not refused, if it never does)."""
    before = validator.validate(token)
    if not before.valid:
        raise RuntimeError(f"the validator refused a live token before its Revoke: {before.error}")
    await on_a.revoke(access_token=token, timeout=30)
    returned = time.perf_counter()
    while True:
        answer = validator.validate(token)
        elapsed = time.perf_counter() - returned
        if not answer.valid and answer.error == "REVOKED":
            return _Sample(returned, elapsed, refused=True)
        if elapsed > GIVE_UP_SECONDS:
            return _Sample(returned, elapsed, refused=False)
        await asyncio.sleep(POLL_SECONDS)


def _delays(samples: list[_Sample]) -> Delays:
    return Delays(
        sorted(s.delay for s in samples), not_refused=sum(1 for s in samples if not s.refused)
    )


async def _cut_phase(
    options: FreshnessOptions,
    result: FreshnessResult,
    on_a: AuthClient,
    validator: LocalValidator,
    tokens: list[str],
    dsn: str,
    a_listeners: tuple[int, ...],
) -> None:
    rng = random.Random()
    cut_times: list[float] = []
    stop = asyncio.Event()

    async def cut_forever() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rng.uniform(*options.cut_every))
                if stop.is_set():
                    return
                ended = await conn.fetchval(
                    CUT_LISTENERS_SQL, LISTENER_APPLICATION_NAME, list(a_listeners)
                )
                if ended:
                    result.listener_cuts += ended
                    cut_times.append(time.perf_counter())
        finally:
            await conn.close()

    samples: list[_Sample] = []
    cutter = asyncio.create_task(cut_forever())
    started = time.perf_counter()
    try:
        for token in tokens:
            if time.perf_counter() - started >= options.cut_seconds or cutter.done():
                break
            samples.append(await _revocation_delay(on_a, validator, token))
            await asyncio.sleep(rng.uniform(0.0, options.cut_pause))
    finally:
        stop.set()
        await cutter  # its failure (the database unreachable) is the run's failure
    result.cut_phase_seconds = time.perf_counter() - started
    result.cut = _delays(samples)
    result.near_cut = sum(
        1 for s in samples if any(0.0 <= s.returned_at - c <= NEAR_CUT_SECONDS for c in cut_times)
    )


def with_freshness(
    report: BenchReport, extra_env: dict[str, str], options: FreshnessOptions | None = None
) -> BenchReport:
    """`report` with the freshness table and setup added (`authsvc bench`)."""
    options = options or FreshnessOptions()
    result = run_freshness(options, extra_env)
    return replace(
        report,
        tables=f"{report.tables}\n\n{result.table()}",
        setup=f"{report.setup}; {setup_line(options)}",
    )


def render(result: FreshnessResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    return f"{result.table()}\n\n{setup_line(result.options)}\n{verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.loadtest.freshness",
        description="Revoke on one replica; time until a LocalValidator on another refuses.",
    )
    parser.add_argument(
        "--revocations", type=bounded_argument(REVOCATIONS), default=200, help="steady phase"
    )
    parser.add_argument(
        "--cut-seconds",
        type=bounded_argument(CUT_SECONDS),
        default=10.0,
        help="seconds of the listener-cut phase (0: skip it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run_freshness(
        FreshnessOptions(revocations=args.revocations, cut_seconds=args.cut_seconds)
    )
    print(render(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
