"""`authsvc bench`: every figure against one server in one run, each as a ratio to its baseline.

What the rows mean and why ratios: docs/performance.md, whose figures section
`authsvc bench --write-docs` rewrites (`service.loadtest.bench_page`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import tempfile
import threading
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
    argon2_rate,
    in_process_rates,
    memory_probe,
    signing_algorithm_costs,
    sql_rotation_rate,
)
from service.loadtest.bench_page import BenchReport, this_machine
from service.loadtest.local import local_server, seed_users
from service.loadtest.runner import LoadPlan, run_load
from service.loadtest.stats import ScenarioSummary

# The bench server's verified-token cache is smaller than the cold token set,
# and cold tokens are cycled in order, so every cold Validate misses the cache
# (FIFO eviction) while the hot set (64 tokens a process) always hits.
BENCH_CACHE_SIZE = 1000
COLD_TOKENS_PER_PROCESS = 2000


@dataclass(frozen=True)
class BenchOptions:
    rounds: int = 3
    """health, validate-hot and validate-cold run interleaved this many times; medians count."""
    duration: float = 6.0
    processes: int = 2
    concurrency: int = 32
    workers: int = 2


@dataclass(frozen=True)
class Baseline:
    name: str
    per_second: float
    note: str


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
            return _run_bench(options, extra_env, production)


@dataclass(frozen=True)
class _ProductionServer:
    target: str
    usernames: tuple[str, ...]
    password: str
    service_token: str


def _run_bench(
    options: BenchOptions, extra_env: dict[str, str], production: _ProductionServer
) -> BenchReport:
    with local_server(workers=options.workers, extra_env=extra_env) as (target, settings):
        usernames, password = seed_users(settings, 16)
        base = LoadPlan(
            target=target,
            scenario="health",
            usernames=usernames,
            password=password,
            processes=options.processes,
            concurrency=options.concurrency,
            duration=options.duration,
        )
        # The three compared with each other run interleaved, so that a noisy
        # minute on this shared machine hits all of them alike.
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
                label="validate-hot, metrics + service token",
            ),
        ]
        runs: list[list[ScenarioSummary]] = [[] for _ in interleaved]
        for _ in range(options.rounds):
            for i, plan in enumerate(interleaved):
                runs[i].append(run_load(plan))
        health, hot, cold, hot_production = (_median(r) for r in runs)
        refresh = run_load(replace(base, scenario="refresh"))
        issue = run_load(replace(base, scenario="issue"))
        under_login, _ = _concurrently(
            replace(base, scenario="validate", label="validate-hot+login"),
            replace(base, scenario="issue", processes=1, concurrency=8, label="login-load"),
        )
        assert settings.database_url is not None
        postgresql = asyncio.run(postgresql_version(settings.database_url))
        in_process_refresh, in_process_issue = asyncio.run(
            in_process_rates(
                replace(settings, workers=options.workers),
                usernames,
                password,
                concurrency=options.concurrency,
                duration=options.duration,
            )
        )
        sql = asyncio.run(
            sql_rotation_rate(
                settings.database_url,
                concurrency=options.concurrency,
                pool_size=settings.db_pool_size * options.workers,
                duration=options.duration,
            )
        )
    cores = os.cpu_count() or 1
    argon2 = argon2_rate(threads=cores, duration=options.duration)
    rss_before, rss_after = memory_probe()
    algorithms = signing_algorithm_costs()
    tables, setup = _report(
        options,
        health=health,
        hot=hot,
        cold=cold,
        hot_production=hot_production,
        refresh=refresh,
        issue=issue,
        under_login=under_login,
        sql_rate=sql,
        argon2_rate=argon2,
        in_process=(in_process_refresh, in_process_issue),
        rss=(rss_before, rss_after),
        algorithms=algorithms,
    )
    return BenchReport(
        tables=tables,
        setup=setup,
        machine=this_machine(postgresql),
        finished_at=datetime.now(UTC),
    )


def _report(
    options: BenchOptions,
    *,
    health: ScenarioSummary,
    hot: ScenarioSummary,
    cold: ScenarioSummary,
    hot_production: ScenarioSummary,
    refresh: ScenarioSummary,
    issue: ScenarioSummary,
    under_login: ScenarioSummary,
    sql_rate: float,
    argon2_rate: float,
    in_process: tuple[float, float],
    rss: tuple[float, float],
    algorithms: list[tuple[str, float, float, int]],
) -> tuple[str, str]:
    """The tables, and the line saying how they were measured."""

    def row(s: ScenarioSummary, baseline: str, ratio: float | None, target: str) -> str:
        errors = s.error_count
        ratio_text = "" if ratio is None else f"{ratio:.2f}"
        return (
            f"| {s.scenario} | {s.requests_per_second:,.0f} | {s.latency_ms['p50']:.2f} | "
            f"{s.latency_ms['p99']:.2f} | {errors} | {baseline} | {ratio_text} | {target} |"
        )

    hp = health.requests_per_second or 1.0
    p99_ratio = under_login.latency_ms["p99"] / (hot.latency_ms["p99"] or 1.0)
    lines = [
        "| benchmark | req/s | p50 ms | p99 ms | errors | baseline | ratio | target |",
        "|---|---:|---:|---:|---:|---|---:|---|",
        row(health, "(empty gRPC call)", None, ""),
        row(hot, "health", hot.requests_per_second / hp, "≥ 0.9"),
        row(cold, "health", cold.requests_per_second / hp, "≥ 0.6"),
        row(
            hot_production,
            "validate-hot",
            hot_production.requests_per_second / (hot.requests_per_second or 1.0),
            "(the cost of both)",
        ),
        row(
            refresh,
            f"SQL-only rotation {sql_rate:,.0f}/s",
            refresh.requests_per_second / sql_rate,
            "≥ 0.5 and ≥ 1,000/s",
        ),
        row(
            issue,
            f"argon2id-only {argon2_rate:,.1f}/s",
            issue.requests_per_second / argon2_rate,
            "≥ 0.8",
        ),
        row(under_login, "validate-hot p99 alone", p99_ratio, "p99 ≤ 2x"),
        f"| refresh in-process (domain + store, no gRPC) | {in_process[0]:,.0f} | | | | "
        f"SQL-only rotation | {in_process[0] / sql_rate:.2f} | (decomposition) |",
        f"| issue in-process (domain + store, no gRPC) | {in_process[1]:,.1f} | | | | "
        f"argon2id-only | {in_process[1] / argon2_rate:.2f} | (decomposition) |",
        f"| memory: 100k cached tokens + 100k revoked sessions | | | | | "
        f"RSS {rss[0]:.0f} → {rss[1]:.0f} MiB | | < 150 MiB |",
    ]
    setup = (
        f"server: {options.workers} workers, load: {options.processes} processes x "
        f"{options.concurrency} concurrent calls in all, {options.duration:g} s per run "
        f"(health and validate: median of {options.rounds} interleaved runs); "
        f"argon2id m={ARGON2_MEMORY_KIB} KiB t={ARGON2_TIME_COST} p={ARGON2_PARALLELISM}"
    )
    alg_lines = [
        "",
        "| signing algorithm | sign µs | verify µs | token bytes |",
        "|---|---:|---:|---:|",
        *(f"| {a} | {s:.0f} | {v:.0f} | {n} |" for a, s, v, n in algorithms),
    ]
    return "\n".join([*lines, *alg_lines]), setup
