"""What `authsvc bench` divides by (`service.loadtest.bench`): each figure of the service
measured without the parts around it, on the same machine in the same run. Refresh's SQL
alone, argon2id alone, refresh and login through the domain without gRPC, the memory of
the caches, and the cost of each signing algorithm.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg

from service.components import open_components
from service.domain.passwords import make_argon2_hasher
from service.domain.records import CallerInfo
from service.settings import Settings
from service.store.refresh_tokens import LOCK_REFRESH_TOKEN_SQL, ROTATE_SQL


async def sql_rotation_rate(
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
                        user_id,
                        0,  # the session's generation (the user's)
                        None,  # the user's bound is not raised (the service does, in steps)
                    )
                token_hash = child
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(walk(s, t) for s, t in chains))
        return done / (time.perf_counter() - start)
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


MEMORY_PROBE = """
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
