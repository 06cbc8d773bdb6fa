"""`authsvc bench`: every figure against one server in one run, each as a ratio to its baseline.

What the rows mean and why ratios: docs/performance.md, whose figures section
`authsvc bench --write-docs` rewrites (`service.loadtest.bench_page`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import statistics
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from service.domain.passwords import (
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
)
from service.loadtest.baselines import (
    RoundTrips,
    argon2_rate,
    in_process_rates,
    memory_probe,
    round_trips_per_call,
    signing_algorithm_costs,
)
from service.loadtest.bench_page import BenchReport, this_machine
from service.loadtest.commands import BENCH_CONCURRENCY
from service.loadtest.cpu import CpuMeter, CpuSeconds
from service.loadtest.freshness import with_freshness
from service.loadtest.local import local_server, local_server_process, seed_users
from service.loadtest.local_validation import local_validation_tables
from service.loadtest.runner import SQL_ROTATION, LoadPlan, run_load, virtual_clients
from service.loadtest.stats import ScenarioSummary

# The bench server's verified-token cache is smaller than the cold token set,
# and cold tokens are cycled in order, so every cold Validate misses the cache
# (FIFO eviction) while the hot set (64 tokens a process) always hits.
BENCH_CACHE_SIZE = 1000
COLD_TOKENS_PER_PROCESS = 2000
PRODUCTION_ROW = "validate-hot, metrics + service token"
SQL_ROW = "sql rotation, one statement"


@dataclass(frozen=True)
class BenchOptions:
    rounds: int = 3
    """health, the validate rows, the SQL rotation and refresh run interleaved this many
    times, and so do logins with argon2id alone; medians count."""
    duration: float = 6.0
    processes: int = 2
    concurrency: int = BENCH_CONCURRENCY
    workers: int = 1


@dataclass(frozen=True)
class Baseline:
    name: str
    per_second: float
    note: str


def per_process(options: BenchOptions) -> str:
    """The virtual clients of each load process, as the runner splits `concurrency`."""
    shares = virtual_clients(options.concurrency, options.processes)
    low, high = min(shares), max(shares)
    return str(low) if low == high else f"{low}-{high}"


def _median(runs: list[ScenarioSummary]) -> ScenarioSummary:
    """The run with the median throughput."""
    return sorted(runs, key=lambda s: s.requests_per_second)[len(runs) // 2]


def _concurrently(*plans: LoadPlan) -> list[ScenarioSummary]:
    results: list[ScenarioSummary | None] = [None] * len(plans)

    def run(i: int) -> None:
        results[i] = run_load(plans[i], show_progress=i == 0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def postgresql_version(database_url: str) -> str:
    """The server's version, as `SHOW server_version` gives it."""
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def run_bench(options: BenchOptions) -> BenchReport:
    """Run the suite; returns the report."""
    extra_env = {"AUTH_TOKEN_CACHE_SIZE": str(BENCH_CACHE_SIZE)}
    if not os.environ.get("AUTH_KEK"):
        # Both servers may share one database (AUTH_DATABASE_URL): one KEK for both.
        extra_env["AUTH_KEK"] = base64.b64encode(secrets.token_bytes(32)).decode()
    # A second server as production runs it: metrics on, Validate only for known services.
    service_token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="authsvc-bench-") as scratch:
        tokens_file = Path(scratch) / "services"
        tokens_file.write_text(f"bench validate token:{service_token}\n")
        production_env = {
            **extra_env,
            "AUTH_METRICS_LISTEN": "127.0.0.1:0",
            "AUTH_CALLER_AUTH": "validate",
            "AUTH_SERVICE_TOKENS_FILE": str(tokens_file),
        }
        with local_server(workers=options.workers, extra_env=production_env) as (prod, prod_set):
            prod_users, prod_password = seed_users(prod_set, 16)
            production = _ProductionServer(prod, prod_users, prod_password, service_token)
            report = _run_bench(options, extra_env, production)
    # Two replicas of its own on one database, after the load (it measures milliseconds).
    return with_freshness(report, extra_env)


@dataclass(frozen=True)
class _ProductionServer:
    target: str
    usernames: tuple[str, ...]
    password: str
    service_token: str


class _CpuWindows:
    """CPU seconds of the server and of PostgreSQL over the measured part of runs, by kind."""

    def __init__(self, meter: CpuMeter) -> None:
        self._meter = meter
        self._started: CpuSeconds | None = None
        self._ended: CpuSeconds | None = None
        self.server: dict[str, float] = {}
        self.postgres: dict[str, float | None] = {}
        self.calls: dict[str, int] = {}
        self.load: dict[str, float] = {}

    def run(self, plan: LoadPlan) -> ScenarioSummary:
        self._started = self._ended = None
        summary = run_load(plan, on_measuring=self._window)
        assert self._started is not None
        assert self._ended is not None
        ended = self._ended
        name = plan.name
        self.server[name] = self.server.get(name, 0.0) + ended.server - self._started.server
        before, after = self._started.postgres, ended.postgres
        previous = self.postgres.get(name, 0.0)
        self.postgres[name] = (
            None
            if before is None or after is None or previous is None
            else previous + after - before
        )
        self.calls[name] = self.calls.get(name, 0) + summary.ok + summary.error_count
        self.load[name] = self.load.get(name, 0.0) + summary.load_cpu_seconds
        return summary

    def _window(self, measuring: bool) -> None:
        if measuring:
            self._started = self._meter.read()
        else:
            self._ended = self._meter.read()

    def per_call_us(self, name: str) -> tuple[float, float | None, float]:
        """Server, PostgreSQL and load-generator CPU microseconds per call."""
        calls = max(1, self.calls.get(name, 0))
        postgres = self.postgres.get(name)
        return (
            self.server.get(name, 0.0) / calls * 1e6,
            None if postgres is None else postgres / calls * 1e6,
            self.load.get(name, 0.0) / calls * 1e6,
        )


def _run_bench(
    options: BenchOptions, extra_env: dict[str, str], production: _ProductionServer
) -> BenchReport:
    with local_server_process(workers=options.workers, extra_env=extra_env) as server:
        target, settings = server.target, server.settings
        assert settings.database_url is not None
        usernames, password = seed_users(settings, 16)
        cpu = _CpuWindows(CpuMeter.attach(server.pid, settings.database_url))
        base = LoadPlan(
            target=target,
            scenario="health",
            usernames=usernames,
            password=password,
            processes=options.processes,
            concurrency=options.concurrency,
            duration=options.duration,
        )
        # Compared with each other, so run interleaved: a noisy minute on a shared machine
        # hits all of them alike. The SQL baseline runs in the same kind of client
        # processes, with the same concurrency, over as many connections as the server has.
        interleaved = [
            base,
            replace(base, scenario="validate"),
            replace(base, scenario="validate", cold_tokens=COLD_TOKENS_PER_PROCESS),
            replace(
                base,
                scenario="validate",
                target=production.target,
                usernames=production.usernames,
                password=production.password,
                service_token=production.service_token,
                label=PRODUCTION_ROW,
            ),
            replace(
                base,
                scenario=SQL_ROTATION,
                target=settings.database_url,
                sql_pool_size=settings.db_pool_size * options.workers,
                label=SQL_ROW,
            ),
            replace(base, scenario="refresh"),
        ]
        runs: list[list[ScenarioSummary]] = [[] for _ in interleaved]
        for _ in range(options.rounds):
            for i, plan in enumerate(interleaved):
                runs[i].append(cpu.run(plan))
        health, hot, cold, hot_production, sql, refresh = (_median(r) for r in runs)
        h, hot_rates, cold_rates, production_rates, sql_rates, refresh_rates = (
            [s.requests_per_second for s in r] for r in runs
        )
        refresh_errors = _errors_of_all(runs[-1])
        # Logins and their baseline alternate, each right after the other (the server idle
        # while argon2id runs alone), as many times as the rows above; medians count.
        issue_runs: list[ScenarioSummary] = []
        argon2_rates: list[float] = []
        for _ in range(options.rounds):
            issue_runs.append(cpu.run(replace(base, scenario="issue")))
            argon2_rates.append(argon2_rate(threads=os.cpu_count() or 1, duration=options.duration))
        issue = _median(issue_runs)
        issue_errors = _errors_of_all(issue_runs)
        argon2 = statistics.median(argon2_rates)
        spreads = {
            "validate-hot": round_ratios(hot_rates, h),
            "validate-cold": round_ratios(cold_rates, h),
            PRODUCTION_ROW: round_ratios(production_rates, hot_rates),
            "refresh": round_ratios(
                refresh_rates, [composite_limit(*pair) for pair in zip(h, sql_rates, strict=True)]
            ),
            "issue": round_ratios([s.requests_per_second for s in issue_runs], argon2_rates),
        }
        under_login, _ = _concurrently(
            replace(base, scenario="validate", label="validate-hot+login"),
            replace(base, scenario="issue", processes=1, concurrency=8, label="login-load"),
        )
        postgresql = asyncio.run(postgresql_version(settings.database_url))
        round_trips = asyncio.run(
            round_trips_per_call(replace(settings, workers=options.workers), usernames, password)
        )
        in_process_refresh, in_process_issue = asyncio.run(
            in_process_rates(
                replace(settings, workers=options.workers),
                usernames,
                password,
                concurrency=options.concurrency,
                duration=options.duration,
            )
        )
    rss_before, rss_after = memory_probe()
    algorithms = signing_algorithm_costs()
    tables, setup = _report(
        options,
        health=health,
        hot=hot,
        cold=cold,
        hot_production=hot_production,
        sql=sql,
        refresh=refresh,
        refresh_errors=refresh_errors,
        issue=issue,
        issue_errors=issue_errors,
        under_login=under_login,
        argon2_rate=argon2,
        spreads=spreads,
        in_process=(in_process_refresh, in_process_issue),
        rss=(rss_before, rss_after),
        algorithms=algorithms,
        costs=_costs(cpu, round_trips),
    )
    # The LocalValidator against Validate, and the memory of watching: servers of their own.
    tables += "\n\n" + local_validation_tables(
        extra_env, concurrency=options.concurrency, duration=options.duration
    )
    return BenchReport(
        tables=tables,
        setup=setup,
        machine=this_machine(postgresql),
        finished_at=datetime.now(UTC),
    )


def _errors_of_all(runs: list[ScenarioSummary]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for run in runs:
        for code, count in run.errors.items():
            errors[code] = errors.get(code, 0) + count
    return errors


@dataclass(frozen=True)
class CostRow:
    operation: str
    round_trips: float | None
    server_us: float | None
    postgres_us: float | None
    load_us: float


def _costs(cpu: _CpuWindows, round_trips: RoundTrips) -> list[CostRow]:
    def measured(name: str, label: str, trips: float | None, server: bool = True) -> CostRow:
        server_us, postgres_us, load_us = cpu.per_call_us(name)
        return CostRow(label, trips, server_us if server else None, postgres_us, load_us)

    return [
        measured("refresh", "refresh", round_trips.refresh),
        measured("issue", "issue (login)", round_trips.login),
        measured("validate-hot", "validate-hot", round_trips.validate),
        measured("validate-cold", "validate-cold", round_trips.validate),
        measured("health", "health (empty call)", 0.0),
        measured(SQL_ROW, SQL_ROW + " (asyncpg alone)", 1.0, server=False),
    ]


def composite_limit(health_rate: float, sql_rate: float) -> float:
    """Calls per second of a call costing one empty gRPC call plus one cheapest rotation,
    each at its own measured rate: 1 / (1/H + 1/S)."""
    if health_rate <= 0 or sql_rate <= 0:
        return 0.0
    return 1.0 / (1.0 / health_rate + 1.0 / sql_rate)


def round_ratios(rates: Sequence[float], baselines: Sequence[float]) -> tuple[float, float] | None:
    """The lowest and highest of each round's rate over the same round's baseline (the
    rounds are interleaved, so a round's rows shared its minutes): how far one round's
    ratio lies from another's in this run. None with fewer than two rounds."""
    ratios = [rate / base for rate, base in zip(rates, baselines, strict=True) if base > 0]
    if len(ratios) < 2:
        return None
    return min(ratios), max(ratios)


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _report(
    options: BenchOptions,
    *,
    health: ScenarioSummary,
    hot: ScenarioSummary,
    cold: ScenarioSummary,
    hot_production: ScenarioSummary,
    sql: ScenarioSummary,
    refresh: ScenarioSummary,
    refresh_errors: dict[str, int],
    issue: ScenarioSummary,
    issue_errors: dict[str, int],
    under_login: ScenarioSummary,
    argon2_rate: float,
    spreads: dict[str, tuple[float, float] | None],
    in_process: tuple[float, float],
    rss: tuple[float, float],
    algorithms: list[tuple[str, float, float, int]],
    costs: list[CostRow],
) -> tuple[str, str]:
    """The tables, and the line saying how they were measured."""

    def row(
        s: ScenarioSummary,
        baseline: str,
        ratio: float | None,
        target: str,
        errors: int | None = None,
    ) -> str:
        ratio_text = "" if ratio is None else f"{ratio:.2f}"
        spread = spreads.get(s.scenario)
        if ratio is not None and spread is not None:
            ratio_text += f" ({spread[0]:.2f}-{spread[1]:.2f})"
        return (
            f"| {s.scenario} | {s.requests_per_second:,.0f} | {s.latency_ms['p50']:.2f} | "
            f"{s.latency_ms['p99']:.2f} | {s.error_count if errors is None else errors} | "
            f"{baseline} | {ratio_text} | {target} |"
        )

    hp = health.requests_per_second or 1.0
    sql_rate = sql.requests_per_second or 1.0
    limit = composite_limit(health.requests_per_second, sql.requests_per_second) or 1.0
    p99_ratio = under_login.latency_ms["p99"] / (hot.latency_ms["p99"] or 1.0)
    lines = [
        "| benchmark | req/s | p50 ms | p99 ms | errors | baseline | ratio | target |",
        "|---|---:|---:|---:|---:|---|---:|---|",
        row(health, "(empty gRPC call: H)", None, ""),
        row(hot, "health", hot.requests_per_second / hp, "≥ 0.9"),
        row(cold, "health", cold.requests_per_second / hp, "≥ 0.6"),
        row(
            hot_production,
            "validate-hot",
            hot_production.requests_per_second / (hot.requests_per_second or 1.0),
            "(the cost of both)",
        ),
        row(sql, "(asyncpg alone: S)", None, "", errors=sql.error_count),
        row(
            refresh,
            f"composite 1/(1/H + 1/S) = {limit:,.0f}/s",
            refresh.requests_per_second / limit,
            "≥ 0.8, 0 errors",
            errors=sum(refresh_errors.values()),
        ),
        row(
            issue,
            f"argon2id-only {argon2_rate:,.1f}/s",
            issue.requests_per_second / argon2_rate,
            "≥ 0.85",
            errors=sum(issue_errors.values()),
        ),
        row(under_login, "validate-hot p99 alone", p99_ratio, "p99 ≤ 2x"),
        f"| refresh in-process (domain + store, no gRPC) | {in_process[0]:,.0f} | | | | "
        f"{SQL_ROW} | {in_process[0] / sql_rate:.2f} | (decomposition) |",
        f"| issue in-process (domain + store, no gRPC) | {in_process[1]:,.1f} | | | | "
        f"argon2id-only | {in_process[1] / argon2_rate:.2f} | (decomposition) |",
        f"| memory: 100k cached tokens + 100k revoked sessions | | | | | "
        f"RSS {rss[0]:.0f} → {rss[1]:.0f} MiB | | < 150 MiB |",
    ]
    cost_lines = [
        "",
        "| cost per operation | database round trips | server CPU µs | PostgreSQL CPU µs "
        "| load generator CPU µs |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {c.operation} | {_number(c.round_trips, 1)} | {_number(c.server_us)} | "
            f"{_number(c.postgres_us)} | {_number(c.load_us)} |"
            for c in costs
        ),
    ]
    setup = (
        f"server: {options.workers} worker{'s' if options.workers != 1 else ''}, load: "
        f"{options.processes} processes, {options.concurrency} concurrent calls in all "
        f"({per_process(options)} each), "
        f"{options.duration:g} s per run (health, validate, {SQL_ROW} and refresh: median of "
        f"{options.rounds} interleaved runs; issue and argon2id-only: median of "
        f"{options.rounds} alternated runs; refresh and issue errors: all their runs; in "
        f"parentheses after a ratio, the lowest and highest of the rounds' own ratios, each "
        f"round's row against that round's baseline); "
        f"CPU: the server's processes, PostgreSQL's and the load processes' own over the "
        f"measured part of each run, divided by its calls; round trips: statements sent per "
        f"call through the server's own code with asyncpg's query logger; argon2id "
        f"m={ARGON2_MEMORY_KIB} KiB t={ARGON2_TIME_COST} p={ARGON2_PARALLELISM}"
    )
    alg_lines = [
        "",
        "| signing algorithm | sign µs | verify µs | token bytes |",
        "|---|---:|---:|---:|",
        *(f"| {a} | {s:.0f} | {v:.0f} | {n} |" for a, s, v, n in algorithms),
    ]
    return "\n".join([*lines, *cost_lines, *alg_lines]), setup
