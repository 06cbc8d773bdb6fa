"""What `authsvc bench` divides by (`service.loadtest.bench`): each figure of the service
measured without the parts around it, on the same machine in the same run. argon2id alone,
refresh and login through the domain without gRPC, the database round trips of each call,
the memory of the caches, and the cost of each signing algorithm. (Refresh's SQL alone runs
in the load generator's processes: `service.loadtest.sql_rotation`.)
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import asyncpg

from service.components import build_components, open_components, start_database_clock
from service.database import create_pool
from service.domain.passwords import lower_thread_priority, make_argon2_hasher
from service.domain.records import CallerInfo
from service.domain.tokens import TokenPair
from service.settings import Settings


@dataclass(frozen=True)
class RoundTrips:
    """Database round trips per call (statements sent through the server's pool)."""

    refresh: float
    login: float
    validate: float


async def round_trips_per_call(
    settings: Settings, usernames: tuple[str, ...], password: str, *, calls: int = 20
) -> RoundTrips:
    """Count what a refresh, a login and a Validate send to PostgreSQL, through the same
    domain and store code the server runs, with asyncpg's query logger on every pooled
    connection. Each operation runs a few times unmeasured first (statements prepared, key
    loaded), then `calls` times one after the other: the mean is the count per call."""
    sent = 0

    def count(_query: asyncpg.connection.LoggedQuery) -> None:
        nonlocal sent
        sent += 1

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(count)

    dsn = settings.database_url
    assert dsn is not None
    # The server's own pool (its reset sends nothing on release), counting statements.
    pool = await create_pool(dsn, settings, init=log_queries)
    caller = CallerInfo(peer="ipv4:127.0.0.1:50000")
    try:
        clock = await start_database_clock(settings, pool, refuse=False)
        components = await build_components(settings, pool=pool, clock=clock)
        try:

            async def login(i: int) -> TokenPair:
                return await components.tokens.issue(
                    username=usernames[i % len(usernames)],
                    password=password,
                    scopes=(),
                    audience=None,
                    caller=caller,
                )

            async def per_call(step: Callable[[int], Awaitable[object]]) -> float:
                nonlocal sent
                for i in range(3):
                    await step(i)
                await asyncio.sleep(0.05)  # the logger is called soon after, not at once
                sent = 0
                for i in range(calls):
                    await step(i)
                await asyncio.sleep(0.05)
                return sent / calls

            pair = await login(0)
            refresh_token = pair.refresh_token

            async def refresh(_i: int) -> None:
                nonlocal refresh_token
                refresh_token = (
                    await components.tokens.refresh(refresh_token, caller=caller)
                ).refresh_token

            async def validate(_i: int) -> None:
                result = await components.validator.validate_with_new_keys(
                    pair.access_token, required_scopes=(), audience=None
                )
                assert result.claims is not None

            return RoundTrips(
                refresh=await per_call(refresh),
                login=await per_call(login),
                validate=await per_call(validate),
            )
        finally:
            components.close()
    finally:
        await pool.close()


async def in_process_rates(
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


def argon2_rate(*, threads: int, duration: float) -> float:
    """argon2id verification of a stored hash alone, with the service's parameters, on
    `threads` threads at the priority of the server's hashing threads (the lowest): the
    same work under the same scheduling, so that other processes on the machine slow
    both alike. (At normal priority the baseline would take its share from them while
    the server's hashing threads yield to them, and the ratio would measure the
    neighbours.)"""
    hasher = make_argon2_hasher()
    password = secrets.token_urlsafe(16)
    password_hash = hasher.hash(password)
    deadline = time.perf_counter() + duration
    counts = [0] * threads

    def work(i: int) -> None:
        lower_thread_priority()  # a fresh thread of this call's own pool
        while time.perf_counter() < deadline:
            hasher.verify(password_hash, password)
            counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, range(threads)))
    return sum(counts) / (time.perf_counter() - start)


MEMORY_PROBE = """
import os, uuid, resource, psutil
import service.app  # everything a worker imports
from service.domain.access_tokens import AccessClaims
from service.domain.revocation import Revocation, RevocationState
from authsvc_client.token_check import VerifiedTokenCache
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


def memory_probe() -> tuple[float, float]:
    """RSS (MiB) of a process with every server module loaded, before and after filling
    the verified-token cache and the revocation state with 100k entries each."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def signing_algorithm_costs(
    rounds: int = 7, samples: int = 100
) -> list[tuple[str, float, float, int]]:
    """Per algorithm: median microseconds to sign and to verify one access token, and
    the token's size. Algorithms alternate within each round, so noise hits all alike."""
    from service.clock import SystemClock
    from service.domain.access_tokens import AccessTokenCodec
    from service.domain.keys import FixedKeys, KeyRing, generate_signing_key, open_signing_key
    from service.secrets_box import SecretBox
    from service.settings import SIGNING_ALGORITHMS

    box = SecretBox(secrets.token_bytes(32))
    codecs = {
        alg: AccessTokenCodec(
            issuer="bench",
            keys=FixedKeys(
                KeyRing([open_signing_key(generate_signing_key(alg, box, datetime.now(UTC)), box)])
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
                    generation=0,
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
