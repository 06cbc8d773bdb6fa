"""`authsvc bench`'s LocalValidator part: checking a token in the caller's process against
asking authsvc's Validate, from one client process, and what following the revocation log
costs in memory (a watcher, and the server with 100k revoked sessions and 1,000 watchers).

Speed: one process, one event loop. Validate over gRPC is `AuthClient.validate` of one
token (the server's verified-token cache hit: its fastest case) with `concurrency` calls in
flight, the most one process gets (also run one call at a time). `LocalValidator.validate`
runs in the same process, sharing the client's channel: hot is one token again and again
(its verified-token cache hit), cold cycles through distinct freshly issued tokens, more of
them than the validator's cache holds, so every check verifies the signature (the cache
misses are counted and checked). The cold check's parts are timed with the functions the
validator runs (authsvc_client.token_check), over the same tokens. The four rates run
interleaved in ROUNDS rounds; each figure is the median.

Memory: the same server afterwards (started for this part: the revoked sessions are made
up and stay in its log), RSS read with psutil: before and after 100k revoked sessions are
appended to the log (one INSERT, as a burst of revocations would be), with 1,000
WatchRevocations streams resuming at the head, and with a few streams that were sent the
whole 100k snapshot; a LocalValidator in a process of its own, RSS before it starts and
once it holds the 100k.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import psutil
from authsvc_client.client import AuthClient, Validation
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.local_validator import LocalValidator
from authsvc_client.token_check import (
    KeySet,
    _b64decode,
    _check_required,
    _expiry_datetime,
    _header,
    _json_object,
    signature_verifies,
    verify_signed,
)

from service.loadtest.cpu import _is_postgres
from service.loadtest.local import local_server_process, seed_users

COLD_TOKENS = 2000
"""Cycled in order through a validator whose cache holds half as many: every cold check
misses (LRU)."""
HOT_TARGET = 50.0
COLD_TARGET = 3.0
REVOKED_SESSIONS = 100_000
CLOSE_WITHIN = 10.0
"""Seconds any one close or small database statement of the memory part may take (the
statements over the 100k rows six times as long): a stall becomes an error or a line naming
its step, not a bench that never ends."""
WATCHERS = 1000
WATCHER_CHANNELS = 10
SNAPSHOT_WATCHERS = 10
ROUNDS = 3
"""The rates are measured in this many interleaved rounds of duration / ROUNDS each."""
_CHUNK_SECONDS = 0.1
"""The synchronous loops give the event loop a turn this often (the validator's stream
must be read, or it goes stale after max_staleness)."""


@dataclass(frozen=True)
class ColdCheck:
    """Microseconds per token of each part of a cold check."""

    decode: float
    """split, strict base64url of the three segments, JSON of header and payload"""
    signature: float
    """key lookup, ES256 low-s check, signature verification"""
    claims: float
    """required claims, expiry timestamp"""
    verify_signed: float
    """the three together, as token_check.verify_signed runs them"""
    validate: float
    """LocalValidator.validate of a cold token, timed as the parts are"""


@dataclass(frozen=True)
class ValidationSpeed:
    grpc_sequential: float
    grpc_concurrent: float
    concurrency: int
    hot: float
    cold: float
    cold_misses: int
    cold_check: ColdCheck

    @property
    def grpc(self) -> float:
        """The denominator: the faster of the two gRPC rates."""
        return max(self.grpc_sequential, self.grpc_concurrent)


@dataclass(frozen=True)
class MemoryFigures:
    """RSS in MiB."""

    server_base: float
    server_revoked: float
    server_before_watchers: float
    server_watchers: float
    server_before_snapshots: float
    server_snapshots: float
    validator_base: float
    validator_revoked: float
    revoked: int = REVOKED_SESSIONS
    watchers: int = WATCHERS
    snapshot_watchers: int = SNAPSHOT_WATCHERS


# --- speed ---------------------------------------------------------------------------


async def _sync_rate(
    check: Callable[[str], Validation], tokens: list[str], duration: float
) -> tuple[float, int]:
    """Calls per second of `check` over `tokens` in order (cycled), in slices of
    _CHUNK_SECONDS between which the event loop runs; and the number of calls."""
    done = 0
    n = len(tokens)
    start = time.perf_counter()
    deadline = start + duration
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        slice_end = min(deadline, now + _CHUNK_SECONDS)
        while time.perf_counter() < slice_end:
            for _ in range(100):
                _valid(check(tokens[done % n]))
                done += 1
        await asyncio.sleep(0)
    return done / (time.perf_counter() - start), done


def _valid(answer: Validation) -> None:
    if not answer.valid:
        raise RuntimeError(f"a LocalValidator answer was not valid: {answer.error}")


async def _grpc_rate(client: AuthClient, token: str, concurrency: int, duration: float) -> float:
    done = 0
    deadline = time.perf_counter() + duration

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if not (await client.validate(token)).valid:
                raise RuntimeError("a Validate answer was not valid")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def _mint_tokens(
    client: AuthClient, usernames: tuple[str, ...], password: str, cold_tokens: int
) -> list[str]:
    """cold_tokens + 1 distinct access tokens signed by the server (a hot one and the
    cold ones): a login per user, then refresh chains."""
    pairs = await asyncio.gather(*(client.issue(u, password) for u in usernames))
    tokens = [p.access_token for p in pairs]
    wanted = cold_tokens + 1
    share = -(-(wanted - len(tokens)) // len(pairs))

    async def chain(refresh_token: str) -> None:
        for _ in range(share):
            pair = await client.refresh(refresh_token)
            refresh_token = pair.refresh_token
            tokens.append(pair.access_token)

    await asyncio.gather(*(chain(p.refresh_token) for p in pairs))
    return tokens[:wanted]


PASSES = 5


async def per_token_us(steps: list[Callable[[int], object]], count: int) -> list[float]:
    """Per step, the least over PASSES of the mean microseconds of `step(i)` for i in
    range(count). The steps take turns within each pass, so the shared machine's noise
    hits all alike; the least is what the code costs with the least of it. The event
    loop runs between steps (a LocalValidator's stream must be read)."""
    means: list[list[float]] = [[] for _ in steps]
    for _ in range(PASSES):
        for step, step_means in zip(steps, means, strict=True):
            start = time.perf_counter()
            for i in range(count):
                step(i)
            step_means.append((time.perf_counter() - start) / count * 1e6)
            await asyncio.sleep(0)
    return [min(m) for m in means]


def cold_check_steps(tokens: list[str], keys: KeySet, issuer: str) -> list[Callable[[int], object]]:
    """Decoding, the signature and the claims checks of token i, each alone, with the
    functions token_check.verify_signed runs, in its order; then verify_signed whole."""
    split = [t.split(".") for t in tokens]

    def decode(i: int) -> None:
        header_b64, payload_b64, signature_b64 = tokens[i].split(".")
        _header(header_b64)
        _b64decode(signature_b64)
        _json_object(_b64decode(payload_b64))

    headers = [_json_object(_b64decode(h)) for h, _, _ in split]
    signatures = [_b64decode(s) for _, _, s in split]
    claims = [_json_object(_b64decode(p)) for _, p, _ in split]

    def signature(i: int) -> None:
        key = keys.get(headers[i].get("kid"))
        assert key is not None
        header_b64, payload_b64, _ = split[i]
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        if not signature_verifies(signing_input, signatures[i], key):
            raise RuntimeError("a server token's signature did not verify")

    def claim_checks(i: int) -> None:
        _check_required(claims[i])
        if claims[i]["iss"] != issuer:
            raise RuntimeError("another issuer")
        _expiry_datetime(claims[i]["exp"])

    return [decode, signature, claim_checks, lambda i: verify_signed(tokens[i], keys, issuer)]


async def measure_speed(
    target: str,
    usernames: tuple[str, ...],
    password: str,
    *,
    issuer: str,
    concurrency: int,
    duration: float,
    cold_tokens: int = COLD_TOKENS,
    clock: Callable[[], float] = time.time,
) -> ValidationSpeed:
    """The rates (calls per second) and the cold check's parts, from this one process.
    `clock`: the validator's (tests: the server's manual clock)."""
    async with AuthClient(target=target) as client:
        hot, *tokens = await _mint_tokens(client, usernames, password, cold_tokens)
        validator = LocalValidator.from_client(
            client, cache_size=cold_tokens // 2, issuer=issuer, clock=clock
        )
        await validator.start()
        try:
            # Interleaved rounds, medians: a noisy moment on a shared machine hits all alike.
            runs: list[tuple[float, float, float, float]] = []
            cold_checks = cold_misses = 0
            for _ in range(ROUNDS):
                grpc_one = await _grpc_rate(client, hot, 1, duration / ROUNDS)
                grpc_many = await _grpc_rate(client, hot, concurrency, duration / ROUNDS)
                hot_run, _ = await _sync_rate(validator.validate, [hot], duration / ROUNDS)
                misses_before = validator.metrics()["verified_cache_misses"]
                checks_before = validator.local_answers
                cold_run, calls = await _sync_rate(validator.validate, tokens, duration / ROUNDS)
                # The next round goes on where this one stopped: the cache holds the last
                # tokens checked, and starting again from the first would hit some.
                tokens = tokens[calls % len(tokens) :] + tokens[: calls % len(tokens)]
                cold_checks += validator.local_answers - checks_before
                cold_misses += int(validator.metrics()["verified_cache_misses"] - misses_before)
                runs.append((grpc_one, grpc_many, hot_run, cold_run))
            grpc_sequential, grpc_concurrent, hot_rate, cold_rate = (
                statistics.median(column) for column in zip(*runs, strict=True)
            )
            if cold_misses != cold_checks:
                raise RuntimeError(f"{cold_checks - cold_misses} cold checks hit the cache")
            keys = KeySet((await client.get_jwks()).json)
            # Each pass of validate goes on where the rates stopped, in order: every check
            # misses the cache.
            misses_before = validator.metrics()["verified_cache_misses"]
            decode, signature, claims, whole, validate = await per_token_us(
                [
                    *cold_check_steps(tokens, keys, issuer),
                    lambda i: _valid(validator.validate(tokens[i])),
                ],
                len(tokens),
            )
            misses = validator.metrics()["verified_cache_misses"] - misses_before
            if misses != PASSES * len(tokens):
                raise RuntimeError("a timed cold check hit the cache")
        finally:
            await validator.close()
    return ValidationSpeed(
        grpc_sequential=grpc_sequential,
        grpc_concurrent=grpc_concurrent,
        concurrency=concurrency,
        hot=hot_rate,
        cold=cold_rate,
        cold_misses=cold_misses,
        cold_check=ColdCheck(decode, signature, claims, whole, validate),
    )


# --- memory --------------------------------------------------------------------------

_MIB = 2**20

VALIDATOR_PROBE = """
import asyncio, gc, json, sys, time, psutil
from authsvc_client.local_validator import LocalValidator

async def main(target, expected):
    validator = LocalValidator(target, max_staleness=30.0)
    gc.collect()
    before = psutil.Process().memory_info().rss
    await validator.start(timeout=60)
    deadline = time.monotonic() + 60
    while validator.revoked_sessions < expected:
        assert time.monotonic() < deadline, "the revoked sessions did not all arrive"
        await asyncio.sleep(0.05)
    gc.collect()
    after = psutil.Process().memory_info().rss
    print(json.dumps([before, after, validator.revoked_sessions]))
    await validator.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _step(text: str) -> None:
    """A progress line: which step a slow or stalled bench is in."""
    print(f"bench: LocalValidator part: {text}", file=sys.stderr, flush=True)


def _server_rss(pid: int) -> float:
    """MiB: the server process and its workers (not the PostgreSQL it started)."""
    server = psutil.Process(pid)
    processes = [server, *(p for p in server.children(recursive=True) if not _is_postgres(p))]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / _MIB


async def _settled_rss(pid: int, seconds: float) -> float:
    await asyncio.sleep(seconds)
    return _server_rss(pid)


async def _append_revoked_sessions(database_url: str, count: int) -> tuple[int, list[int]]:
    """`count` made-up revoked sessions appended to the log in one transaction (kept ten
    minutes); the log's head after them, and their row ids."""
    conn = await asyncpg.connect(database_url, timeout=CLOSE_WITHIN)
    try:
        ids = await conn.fetchval(
            """WITH added AS (
                   INSERT INTO revocation_log (kind, session_id, revoked_at, keep_until)
                   SELECT 'session', gen_random_uuid(), now(), now() + interval '10 minutes'
                     FROM generate_series(1, $1)
                   RETURNING id)
               SELECT array_agg(id) FROM added""",
            count,
            timeout=6 * CLOSE_WITHIN,
        )
        head = await conn.fetchval("SELECT sequence FROM revocation_log_head", timeout=CLOSE_WITHIN)
        return int(head), list(ids)
    finally:
        await asyncio.wait_for(conn.close(), CLOSE_WITHIN)


async def _remove_log_rows(database_url: str, ids: list[int]) -> None:
    """Delete those rows as the janitor does (raising the compaction horizon past them), so
    a database the bench was pointed at (AUTH_DATABASE_URL) keeps none of them."""
    conn = await asyncpg.connect(database_url, timeout=CLOSE_WITHIN)
    try:
        await conn.execute(
            """WITH gone AS (DELETE FROM revocation_log WHERE id = ANY($1) RETURNING sequence)
               UPDATE revocation_log_horizon
                  SET compacted_through = greatest(compacted_through,
                                                   (SELECT max(sequence) FROM gone))
                WHERE EXISTS (SELECT 1 FROM gone)""",
            ids,
            timeout=6 * CLOSE_WITHIN,
        )
    finally:
        await asyncio.wait_for(conn.close(), CLOSE_WITHIN)


class _Streams:
    """WatchRevocations streams over a few channels, each read in a task of its own."""

    def __init__(self, target: str, channels: int) -> None:
        self._channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self._calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.synced = 0
        self.failed: list[str] = []

    def open(self, count: int, after_sequence: int) -> None:
        for i in range(count):
            stub = auth_pb2_grpc.AuthServiceStub(self._channels[i % len(self._channels)])
            call = stub.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after_sequence=after_sequence)
            )
            self._calls.append(call)
            self._tasks.append(asyncio.create_task(self._read(call)))

    async def _read(
        self,
        call: grpc.aio.UnaryStreamCall[auth_pb2.WatchRevocationsRequest, auth_pb2.RevocationUpdate],
    ) -> None:
        counted = False
        try:
            async for update in call:
                if update.sequence and not counted:  # the first updates are in
                    counted = True
                    self.synced += 1
        except grpc.aio.AioRpcError as error:
            self.failed.append(error.code().name)

    async def until_synced(self, count: int, within: float) -> None:
        deadline = time.monotonic() + within
        while self.synced < count:
            if self.failed:
                raise RuntimeError(f"watch streams failed: {sorted(set(self.failed))}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.synced} of {count} watch streams synced")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Each call cancelled first, then its reader and the channels, every wait bounded
        (CLOSE_WITHIN): grpc.aio's channel close and a cancelled reader of a stream have
        been known to wait forever (grpc/grpc#32005, #41875), and the figures are taken."""
        within = CLOSE_WITHIN
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=within)
            if pending:
                _step(f"{len(pending)} watch readers did not stop")
        for channel in self._channels:
            try:
                await asyncio.wait_for(channel.close(), within)
            except TimeoutError:
                _step("a channel did not close")


async def _measure_memory(
    target: str,
    database_url: str,
    pid: int,
    *,
    revoked: int = REVOKED_SESSIONS,
    watchers: int = WATCHERS,
    snapshot_watchers: int = SNAPSHOT_WATCHERS,
    settle: float = 1.0,
) -> MemoryFigures:
    """`settle`: seconds to wait before each reading (the server finishes what it was
    doing; the streams' heartbeats flow)."""
    server_base = await _settled_rss(pid, settle)
    _step(f"appending {revoked:,} revoked sessions")
    head, added = await _append_revoked_sessions(database_url, revoked)
    try:
        # The validator's process: once it holds all of them, so does the server it asked.
        _step("a LocalValidator process takes them in")
        probe = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            VALIDATOR_PROBE,
            target,
            str(revoked),
            stdout=subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(probe.communicate(), 120)
        if probe.returncode != 0:
            raise RuntimeError("the LocalValidator memory probe failed")
        validator_before, validator_after, held = json.loads(out)
        if held < revoked:
            raise RuntimeError(f"the validator held {held} revoked sessions")
        server_revoked = await _settled_rss(pid, settle)

        _step(f"{watchers:,} WatchRevocations streams")
        resuming = _Streams(target, WATCHER_CHANNELS)
        try:
            resuming.open(watchers, after_sequence=head)  # nothing missed: no snapshot
            await resuming.until_synced(watchers, within=60)
            server_watchers = await _settled_rss(pid, settle)
        finally:
            _step("closing them")
            await resuming.close()
        server_before_snapshots = await _settled_rss(pid, settle)
        _step(f"{snapshot_watchers} streams sent the whole snapshot")
        snapshots = _Streams(target, 1)
        try:
            snapshots.open(snapshot_watchers, after_sequence=0)
            await snapshots.until_synced(snapshot_watchers, within=60)
            server_snapshots = await _settled_rss(pid, settle)
        finally:
            _step("closing them")
            await snapshots.close()
    finally:
        _step("removing the revoked sessions")
        await _remove_log_rows(database_url, added)
    return MemoryFigures(
        server_base=server_base,
        server_revoked=server_revoked,
        server_before_watchers=server_revoked,
        server_watchers=server_watchers,
        server_before_snapshots=server_before_snapshots,
        server_snapshots=server_snapshots,
        validator_base=validator_before / _MIB,
        validator_revoked=validator_after / _MIB,
        revoked=revoked,
        watchers=watchers,
        snapshot_watchers=snapshot_watchers,
    )


def measure_local_validation(
    extra_env: dict[str, str], *, concurrency: int, duration: float
) -> tuple[ValidationSpeed, MemoryFigures]:
    """Both parts against one server started for them (its log then holds the made-up
    revoked sessions): the speed part first, then the memory part from its own baseline."""
    env = {
        **extra_env,
        # 1,000 streams from this one address, and a few more.
        "AUTH_MAX_STREAMS": str(WATCHERS + SNAPSHOT_WATCHERS + 100),
        "AUTH_MAX_STREAMS_PER_PEER": str(WATCHERS + SNAPSHOT_WATCHERS + 100),
    }
    with local_server_process(workers=1, extra_env=env) as server:
        database_url = server.settings.database_url
        assert database_url is not None
        usernames, password = seed_users(server.settings, 8)

        async def both() -> tuple[ValidationSpeed, MemoryFigures]:
            _step("speed against Validate over gRPC")
            speed = await measure_speed(
                server.target,
                usernames,
                password,
                issuer=server.settings.issuer,
                concurrency=concurrency,
                duration=duration,
            )
            gc.collect()
            return speed, await _measure_memory(server.target, database_url, server.pid)

        return asyncio.run(both())


def local_validation_tables(extra_env: dict[str, str], *, concurrency: int, duration: float) -> str:
    """`authsvc bench`'s hook: measure, and the tables."""
    return report_tables(
        *measure_local_validation(extra_env, concurrency=concurrency, duration=duration)
    )


def _per(delta_mib: float, count: int) -> str:
    return f"{max(0.0, delta_mib) * _MIB / count:,.0f} bytes each"


def report_tables(speed: ValidationSpeed, memory: MemoryFigures) -> str:
    """Markdown: the rates and ratios, the cold check's parts, the memory figures."""
    grpc_rate = speed.grpc or 1.0
    c = speed.cold_check
    rest = c.validate - c.verify_signed
    memory_rows = [
        (
            f"server, {memory.revoked // 1000}k revoked sessions in the log",
            memory.server_base,
            memory.server_revoked,
            _per(memory.server_revoked - memory.server_base, memory.revoked),
        ),
        (
            f"server, {memory.watchers:,} WatchRevocations streams (resuming at the head)",
            memory.server_before_watchers,
            memory.server_watchers,
            _per(memory.server_watchers - memory.server_before_watchers, memory.watchers),
        ),
        (
            f"server, {memory.snapshot_watchers} streams sent the {memory.revoked // 1000}k "
            "snapshot",
            memory.server_before_snapshots,
            memory.server_snapshots,
            _per(
                memory.server_snapshots - memory.server_before_snapshots,
                memory.snapshot_watchers,
            ),
        ),
        (
            f"LocalValidator process, holding {memory.revoked // 1000}k revoked sessions",
            memory.validator_base,
            memory.validator_revoked,
            _per(memory.validator_revoked - memory.validator_base, memory.revoked),
        ),
    ]
    return "\n".join(
        [
            "| one client process | calls/s | baseline | ratio | target |",
            "|---|---:|---|---:|---|",
            f"| Validate over gRPC, one call at a time | {speed.grpc_sequential:,.0f} | | | |",
            f"| Validate over gRPC, {speed.concurrency} in flight | "
            f"{speed.grpc_concurrent:,.0f} | | | |",
            f"| LocalValidator hot (verified-token cache hit) | {speed.hot:,.0f} | "
            f"Validate over gRPC ({grpc_rate:,.0f}/s) | {speed.hot / grpc_rate:.1f} | "
            f"≥ {HOT_TARGET:g} |",
            f"| LocalValidator cold (signature checked, {speed.cold_misses:,} cache misses) | "
            f"{speed.cold:,.0f} | Validate over gRPC ({grpc_rate:,.0f}/s) | "
            f"{speed.cold / grpc_rate:.1f} | ≥ {COLD_TARGET:g} |",
            "",
            "| cold check, per token | µs | share |",
            "|---|---:|---:|",
            *(
                f"| {name} | {us:.1f} | {us / c.validate:.0%} |"
                for name, us in (
                    ("base64url + JSON (header: once a key; payload, signature)", c.decode),
                    ("signature (key lookup, low-s check, ES256 verify)", c.signature),
                    ("claims (required claims, issuer, expiry timestamp)", c.claims),
                    ("verify_signed as a whole (the three above)", c.verify_signed),
                    (
                        "the rest of validate (request limits, digest, LRU, lifetime, "
                        "revocation, audience, scopes, answer)",
                        rest,
                    ),
                    ("LocalValidator.validate, cold", c.validate),
                )
            ),
            "",
            "| memory (RSS) | before MiB | after MiB | per entry / stream |",
            "|---|---:|---:|---:|",
            *(
                f"| {name} | {before:.0f} | {after:.0f} | {per} |"
                for name, before, after, per in memory_rows
            ),
        ]
    )
