"""`authsvc bench`: every figure against one server in one run, each as a ratio to its baseline.

This machine is small and noisy, so absolute numbers move between runs; the
ratios, measured minutes apart against the same server, are what to compare.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from service.components import open_components
from service.domain.passwords import (
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
    make_argon2_hasher,
)
from service.domain.tokens import CallerInfo
from service.loadtest.local import local_server, seed_users
from service.loadtest.runner import LoadPlan, run_load
from service.loadtest.stats import ScenarioSummary
from service.settings import Settings
from service.store.postgres import LOCK_REFRESH_TOKEN_SQL, ROTATE_SQL

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


async def _sql_rotation_rate(
    dsn: str, *, concurrency: int, pool_size: int, duration: float
) -> float:
    """Refresh's SQL alone: lock and read the token, rotate it, in one transaction."""
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    assert pool is not None
    now = datetime.now(UTC)
    far = now + timedelta(days=1)
    chains: list[tuple[uuid.UUID, bytes]] = []
    try:
        async with pool.acquire() as conn:
            user_id = uuid.uuid4()
            await conn.execute(
                """INSERT INTO users (id, username, username_key, password_hash, created_at,
                                      updated_at)
                   VALUES ($1, $2, $2, 'x', $3, $3)""",
                user_id,
                f"bench-sql-{user_id.hex[:8]}",
                now,
            )
            for _ in range(concurrency):
                session_id, token_hash = uuid.uuid4(), secrets.token_bytes(32)
                await conn.execute(
                    """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                             access_expires_max)
                       VALUES ($1, $2, '{}', 'bench', $3, $4, $4)""",
                    session_id,
                    user_id,
                    now,
                    far,
                )
                await conn.execute(
                    """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
                       VALUES ($1, $2, $3, $4)""",
                    token_hash,
                    session_id,
                    now,
                    far,
                )
                chains.append((session_id, token_hash))
        done = 0
        deadline = time.perf_counter() + duration

        async def walk(session_id: uuid.UUID, token_hash: bytes) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                child = hashlib.sha256(token_hash).digest()
                async with pool.acquire() as conn, conn.transaction():
                    await conn.fetchrow(LOCK_REFRESH_TOKEN_SQL, token_hash)
                    await conn.execute(
                        ROTATE_SQL,
                        token_hash,
                        session_id,
                        datetime.now(UTC),
                        child,
                        far,
                        far,
                        "ipv4:127.0.0.1:50000",  # the rotating peer, as the service stores it
                    )
                token_hash = child
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(walk(s, t) for s, t in chains))
        return done / (time.perf_counter() - start)
    finally:
        await pool.close()


async def _in_process_rates(
    settings: Settings,
    usernames: tuple[str, ...],
    password: str,
    *,
    concurrency: int,
    duration: float,
) -> tuple[float, float]:
    """Refresh and login through the domain and store alone (no gRPC), same concurrency:
    the middle step between the bare baselines and the full calls."""
    # As many connections as the server's workers have together.
    pool_size = settings.db_pool_size * settings.workers
    caller = CallerInfo()
    async with open_components(
        replace(settings, db_pool_size=pool_size), key_material=True
    ) as components:

        async def login(i: int) -> str:
            pair = await components.tokens.issue(
                username=usernames[i % len(usernames)],
                password=password,
                scopes=(),
                audience=None,
                caller=caller,
            )
            return pair.refresh_token

        async def rate(step: Callable[[int], Awaitable[None]]) -> float:
            done = 0
            deadline = time.perf_counter() + duration

            async def loop(i: int) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await step(i)
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*(loop(i) for i in range(concurrency)))
            return done / (time.perf_counter() - start)

        tokens = list(await asyncio.gather(*(login(i) for i in range(concurrency))))

        async def refresh(i: int) -> None:
            pair = await components.tokens.refresh(tokens[i], caller=caller)
            tokens[i] = pair.refresh_token

        async def issue(i: int) -> None:
            await login(i)

        return await rate(refresh), await rate(issue)


def _argon2_rate(*, threads: int, duration: float) -> float:
    """argon2id verification alone, with the service's parameters, on `threads` threads."""
    hasher = make_argon2_hasher()
    password = secrets.token_urlsafe(16)
    password_hash = hasher.hash(password)
    deadline = time.perf_counter() + duration
    counts = [0] * threads

    def work(i: int) -> None:
        while time.perf_counter() < deadline:
            hasher.verify(password_hash, password)
            counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, range(threads)))
    return sum(counts) / (time.perf_counter() - start)


_MEMORY_PROBE = """
import os, uuid, resource, psutil
import service.app  # everything a worker imports
from service.domain.access_tokens import AccessClaims
from service.domain.revocation import Revocation, RevocationState, VerifiedTokenCache
before = psutil.Process().memory_info().rss
cache = VerifiedTokenCache(100_000)
state = RevocationState()
for n in range(100_000):
    sid = str(uuid.uuid4())
    token = "eyJ" + os.urandom(150).hex()
    cache.put(cache.key(token), AccessClaims(
        subject=str(uuid.uuid4()), session_id=sid, token_id=uuid.uuid4().hex,
        scopes=("read", "write"), audiences=("authsvc",), issued_at=1.9e9,
        expires_at=1.9e9 + 900, not_before=None))
    state.add([Revocation(str(uuid.uuid4()), 1.9e9, 1.9e9 + 900)])
after = psutil.Process().memory_info().rss
print(before / 2**20, after / 2**20)
"""


def _memory_probe() -> tuple[float, float]:
    """RSS (MiB) of a process with every server module loaded, before and after filling
    the verified-token cache and the revocation state with 100k entries each."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def signing_algorithm_costs(
    rounds: int = 7, samples: int = 100
) -> list[tuple[str, float, float, int]]:
    """Per algorithm: median microseconds to sign and to verify one access token, and
    the token's size. Algorithms alternate within each round, so noise hits all alike."""
    from service.clock import SystemClock
    from service.domain.access_tokens import AccessTokenCodec
    from service.domain.keys import KeyRing, generate_signing_key, open_signing_key
    from service.secrets_box import SecretBox
    from service.settings import SIGNING_ALGORITHMS

    box = SecretBox(secrets.token_bytes(32))
    codecs = {
        alg: AccessTokenCodec(
            issuer="bench",
            key_ring=KeyRing(
                [open_signing_key(generate_signing_key(alg, box, datetime.now(UTC)), box)]
            ),
            clock=SystemClock(),
            leeway=0,
        )
        for alg in SIGNING_ALGORITHMS
    }
    sign_us: dict[str, list[float]] = {alg: [] for alg in codecs}
    verify_us: dict[str, list[float]] = {alg: [] for alg in codecs}
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        for alg, codec in codecs.items():
            start = time.perf_counter()
            tokens = [
                codec.sign(
                    subject=str(uuid.uuid4()),
                    session_id=str(uuid.uuid4()),
                    audience="bench",
                    scopes=("read", "write"),
                    issued_at=int(time.time()),
                    expires_at=int(time.time()) + 900,
                ).token
                for _ in range(samples)
            ]
            signed = time.perf_counter()
            for token in tokens:
                codec.verify(token)
            verified = time.perf_counter()
            sign_us[alg].append((signed - start) / samples * 1e6)
            verify_us[alg].append((verified - signed) / samples * 1e6)
            sizes[alg] = len(tokens[0])
    return [
        (alg, statistics.median(sign_us[alg]), statistics.median(verify_us[alg]), sizes[alg])
        for alg in codecs
    ]


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


def run_bench(options: BenchOptions) -> str:
    """Run the suite; returns the markdown report."""
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
) -> str:
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
        in_process_refresh, in_process_issue = asyncio.run(
            _in_process_rates(
                replace(settings, workers=options.workers),
                usernames,
                password,
                concurrency=options.concurrency,
                duration=options.duration,
            )
        )
        sql = asyncio.run(
            _sql_rotation_rate(
                settings.database_url,
                concurrency=options.concurrency,
                pool_size=settings.db_pool_size * options.workers,
                duration=options.duration,
            )
        )
    cores = os.cpu_count() or 1
    argon2 = _argon2_rate(threads=cores, duration=options.duration)
    rss_before, rss_after = _memory_probe()
    algorithms = signing_algorithm_costs()
    return _report(
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
) -> str:
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
    machine = (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d}; "
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
    return "\n".join([*lines, *alg_lines, "", machine])
