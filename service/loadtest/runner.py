"""A multi-process grpc.aio load generator.

One Python client process saturates early, so the load is spread over
processes, each with its own event loop and its own TCP connection. Each
process sets up what its scenario needs (sessions, a hot or a cold set of
access tokens), all processes start measuring together, and their latencies
are merged exactly (no averaging of percentiles).

Closed loop (default): `concurrency` virtual clients each send their next
request when the previous one is answered. Open loop (`rate`): requests leave
on a fixed schedule whatever the server does, and latency is measured from the
scheduled send time, so a stalled server cannot hide its stall (no coordinated
omission).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import multiprocessing.synchronize
import queue
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized

import asyncpg
import grpc
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.loadtest.sql_rotation import RotationRefused, SqlRotations
from service.loadtest.stats import ProcessResult, ScenarioSummary, summarize
from service.processes import die_with_parent

SCENARIOS = ("validate", "refresh", "issue", "mixed", "health")
# The bench's SQL baseline (`service.loadtest.sql_rotation`): `target` is a database URL.
SQL_ROTATION = "sql-rotation"
# mixed: validate / refresh / issue
MIXED_WEIGHTS = (0.90, 0.08, 0.02)
_SETUP_TIMEOUT = 300.0
# Each process spreads its virtual clients over this many connections, so that
# SO_REUSEPORT can balance them over the server's workers as it would many clients.
CONNECTIONS_PER_PROCESS = 4
_CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class LoadPlan:
    """One load run."""

    target: str
    scenario: str
    usernames: tuple[str, ...]
    password: str
    processes: int = 2
    concurrency: int = 32
    """Virtual clients in all processes together (closed loop), or the in-flight cap (open loop)."""
    duration: float = 10.0
    rate: float | None = None
    """Requests per second over all processes: open loop. None: closed loop."""
    cold_tokens: int = 0
    """validate: 0 cycles a hot set of `hot_tokens`; N > 0 cycles N distinct tokens per process."""
    hot_tokens: int = 64
    label: str | None = None
    service_token: str | None = None
    """Sent as `authorization: Bearer` on Validate (a server with AUTH_CALLER_AUTH=validate)."""
    sql_pool_size: int = 2
    """sql-rotation: database connections in all processes together."""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.scenario == "validate":
            return "validate-cold" if self.cold_tokens else "validate-hot"
        return self.scenario


class _Rejected(Exception):
    """A call that succeeded at the RPC level but not in substance (valid=false)."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


class _Session:
    """A refresh-token chain owned by one virtual client at a time."""

    def __init__(self, pair: auth_pb2.TokenPair) -> None:
        self.refresh_token = pair.refresh_token


class _Client:
    """The calls a load process makes, spread over its channels."""

    def __init__(self, plan: LoadPlan, channels: list[grpc.aio.Channel], seed: int) -> None:
        self._plan = plan
        auth = [auth_pb2_grpc.AuthServiceStub(c) for c in channels]
        health = [health_pb2_grpc.HealthStub(c) for c in channels]
        self._stubs = itertools.cycle(list(zip(auth, health, strict=True)))
        self._random = random.Random(seed)
        self.tokens: list[str] = []
        self._token_index = itertools.count()
        self._validate_metadata: tuple[tuple[str, str], ...] | None = (
            None
            if plan.service_token is None
            else (("authorization", f"Bearer {plan.service_token}"),)
        )
        self.sessions: asyncio.Queue[_Session] = asyncio.Queue()

    def _auth(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        return next(self._stubs)[0]

    async def login(self) -> auth_pb2.TokenPair:
        username = self._random.choice(self._plan.usernames)
        request = auth_pb2.IssueRequest(
            password=auth_pb2.PasswordCredentials(username=username, password=self._plan.password)
        )
        response: auth_pb2.IssueResponse = await self._auth().Issue(request, timeout=_CALL_TIMEOUT)
        return response.tokens

    async def mint_tokens(self, count: int, chains: int = 8) -> None:
        """`count` distinct access tokens, cheaply: a few logins, then refresh chains."""
        pairs = await asyncio.gather(*(self.login() for _ in range(min(chains, count))))
        tokens = [p.access_token for p in pairs]

        async def walk(pair: auth_pb2.TokenPair, n: int) -> None:
            token = pair.refresh_token
            for _ in range(n):
                response: auth_pb2.RefreshResponse = await self._auth().Refresh(
                    auth_pb2.RefreshRequest(refresh_token=token), timeout=_CALL_TIMEOUT
                )
                token = response.tokens.refresh_token
                tokens.append(response.tokens.access_token)

        remaining = count - len(tokens)
        if remaining > 0:
            share = -(-remaining // len(pairs))
            await asyncio.gather(*(walk(p, share) for p in pairs))
        self.tokens = tokens[:count]

    async def add_sessions(self, count: int) -> None:
        for pair in await asyncio.gather(*(self.login() for _ in range(count))):
            self.sessions.put_nowait(_Session(pair))

    async def validate(self) -> None:
        token = self.tokens[next(self._token_index) % len(self.tokens)]
        response: auth_pb2.ValidateResponse = await self._auth().Validate(
            auth_pb2.ValidateRequest(access_token=token),
            timeout=_CALL_TIMEOUT,
            metadata=self._validate_metadata,
        )
        if not response.valid:
            raise _Rejected("VALID_FALSE_" + auth_pb2.ValidationError.Name(response.error))

    async def refresh(self) -> None:
        try:
            session = self.sessions.get_nowait()
        except asyncio.QueueEmpty:
            raise _Rejected("NO_FREE_SESSION") from None
        try:
            response: auth_pb2.RefreshResponse = await self._auth().Refresh(
                auth_pb2.RefreshRequest(refresh_token=session.refresh_token),
                timeout=_CALL_TIMEOUT,
            )
            session.refresh_token = response.tokens.refresh_token
        finally:
            self.sessions.put_nowait(session)

    async def issue(self) -> None:
        await self.login()

    async def health(self) -> None:
        response: health_pb2.HealthCheckResponse = await next(self._stubs)[1].Check(
            health_pb2.HealthCheckRequest(), timeout=_CALL_TIMEOUT
        )
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise _Rejected("NOT_SERVING")

    def operation(self) -> Callable[[], Awaitable[None]]:
        scenario = self._plan.scenario
        if scenario == "validate":
            return self.validate
        if scenario == "refresh":
            return self.refresh
        if scenario == "issue":
            return self.issue
        if scenario == "health":
            return self.health
        # mixed
        roll = self._random.random()
        if roll < MIXED_WEIGHTS[0]:
            return self.validate
        if roll < MIXED_WEIGHTS[0] + MIXED_WEIGHTS[1]:
            return self.refresh
        return self.issue


async def _measured(
    op: Callable[[], Awaitable[None]], result: ProcessResult, started: float
) -> None:
    try:
        await op()
    except grpc.aio.AioRpcError as error:
        result.errors[error.code().name] += 1
    except _Rejected as rejected:
        result.errors[rejected.label] += 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError, RotationRefused) as error:
        result.errors[type(error).__name__] += 1
    else:
        result.latencies.append(time.perf_counter() - started)


async def _run_process(
    plan: LoadPlan,
    index: int,
    clients: int,
    barrier: multiprocessing.synchronize.Barrier,
    progress: Synchronized[int],
) -> ProcessResult:
    if plan.scenario == SQL_ROTATION:
        return await _run_sql_process(plan, index, clients, barrier, progress)
    channels = [
        grpc.aio.insecure_channel(plan.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS_PER_PROCESS)
    ]
    client = _Client(plan, channels, seed=index)
    result = ProcessResult()
    try:
        if plan.scenario in ("validate", "mixed"):
            await client.mint_tokens(plan.cold_tokens or plan.hot_tokens)
        if plan.scenario in ("refresh", "mixed"):
            await client.add_sessions(clients)
        await _measure(plan, client.operation, result, clients, barrier, progress)
    finally:
        for channel in channels:
            await channel.close()
    return result


async def _run_sql_process(
    plan: LoadPlan,
    index: int,
    clients: int,
    barrier: multiprocessing.synchronize.Barrier,
    progress: Synchronized[int],
) -> ProcessResult:
    """sql-rotation: this process's share of the pool, one chain per virtual client."""
    share = plan.sql_pool_size // plan.processes + (
        1 if index < plan.sql_pool_size % plan.processes else 0
    )
    rotations = SqlRotations(plan.target, chains=clients, pool_size=max(1, share))
    result = ProcessResult()
    try:
        await rotations.open()
        await _measure(plan, lambda: rotations.rotate, result, clients, barrier, progress)
    finally:
        await rotations.close()
    return result


async def _measure(
    plan: LoadPlan,
    operation: Callable[[], Callable[[], Awaitable[None]]],
    result: ProcessResult,
    clients: int,
    barrier: multiprocessing.synchronize.Barrier,
    progress: Synchronized[int],
) -> None:
    """Wait for every process to be set up, then run the loop for `plan.duration`."""
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, _SETUP_TIMEOUT)
    start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = start + plan.duration

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(0.25)
            progress.value = len(result.latencies) + sum(result.errors.values())

    reporter = asyncio.create_task(report_progress())
    if plan.rate is None:
        await _closed_loop(operation, result, clients, deadline)
    else:
        await _open_loop(operation, result, plan.rate / plan.processes, clients, start, deadline)
    result.elapsed = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    reporter.cancel()
    progress.value = len(result.latencies) + sum(result.errors.values())


async def _closed_loop(
    operation: Callable[[], Callable[[], Awaitable[None]]],
    result: ProcessResult,
    clients: int,
    deadline: float,
) -> None:
    async def virtual_client() -> None:
        while time.perf_counter() < deadline:
            await _measured(operation(), result, time.perf_counter())

    await asyncio.gather(*(virtual_client() for _ in range(clients)))


async def _open_loop(
    operation: Callable[[], Callable[[], Awaitable[None]]],
    result: ProcessResult,
    rate: float,
    max_in_flight: int,
    start: float,
    deadline: float,
) -> None:
    interval = 1.0 / rate
    in_flight: set[asyncio.Task[None]] = set()
    for i in itertools.count():
        scheduled = start + i * interval
        if scheduled >= deadline:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            result.dropped += 1
            continue
        # Latency counts from the scheduled time, not from when we got round to it.
        task = asyncio.create_task(_measured(operation(), result, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=_CALL_TIMEOUT)


def _process_entry(
    plan: LoadPlan,
    index: int,
    clients: int,
    barrier: multiprocessing.synchronize.Barrier,
    progress: Synchronized[int],
    results: multiprocessing.Queue[tuple[int, ProcessResult | str]],
) -> None:
    # A killed run must not leave its load processes calling on for the run's duration.
    die_with_parent()
    try:
        outcome: ProcessResult | str = asyncio.run(
            _run_process(plan, index, clients, barrier, progress)
        )
    except Exception as exc:  # reported to the parent, which fails the run
        barrier.abort()
        outcome = f"{type(exc).__name__}: {exc}"
    results.put((index, outcome))


def virtual_clients(concurrency: int, processes: int) -> list[int]:
    """Each load process's share of `concurrency` (the first ones one more when it does not
    divide evenly)."""
    return [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]


def run_load(
    plan: LoadPlan,
    *,
    show_progress: bool = True,
    on_measuring: Callable[[bool], None] | None = None,
) -> ScenarioSummary:
    """Run one scenario over `plan.processes` processes; blocks for about its duration.

    `on_measuring` is told True when every process starts measuring (after its set-up) and
    False when the measured time is over (the bench reads CPU times then)."""
    if plan.scenario not in (*SCENARIOS, SQL_ROTATION):
        raise ValueError(f"unknown scenario {plan.scenario!r}")
    context = multiprocessing.get_context("spawn")  # no gRPC state crosses a fork
    barrier = context.Barrier(plan.processes + 1)
    results: multiprocessing.Queue[tuple[int, ProcessResult | str]] = context.Queue()
    counters = [context.Value("q", 0) for _ in range(plan.processes)]
    shares = virtual_clients(plan.concurrency, plan.processes)
    processes = [
        context.Process(
            target=_process_entry,
            args=(plan, i, max(1, shares[i]), barrier, counters[i], results),
            daemon=True,
        )
        for i in range(plan.processes)
    ]
    for process in processes:
        process.start()
    collected: dict[int, ProcessResult | str] = {}
    try:
        try:
            barrier.wait(_SETUP_TIMEOUT)
        except threading.BrokenBarrierError:
            pass  # a process failed its setup; its error arrives below
        else:
            if on_measuring is not None:
                on_measuring(True)
            _show_progress(plan, counters, processes, show_progress)
            if on_measuring is not None:
                on_measuring(False)
        deadline = time.monotonic() + plan.duration + _SETUP_TIMEOUT
        while len(collected) < plan.processes and time.monotonic() < deadline:
            try:
                index, outcome = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
                continue
            collected[index] = outcome
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    failures = [o for o in collected.values() if isinstance(o, str)]
    if failures or len(collected) < plan.processes:
        raise RuntimeError(f"load process failed: {failures or 'no result'}")
    return summarize(
        plan.name,
        [o for o in collected.values() if isinstance(o, ProcessResult)],
        processes=plan.processes,
        concurrency=plan.concurrency,
        rate=plan.rate,
    )


def _show_progress(
    plan: LoadPlan,
    counters: list[Synchronized[int]],
    processes: Sequence[multiprocessing.process.BaseProcess],
    enabled: bool,
) -> None:
    start = time.monotonic()
    end = start + plan.duration
    while time.monotonic() < end and any(p.is_alive() for p in processes):
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        if not enabled:
            continue
        elapsed = time.monotonic() - start
        done = sum(c.value for c in counters)
        line = (
            f"[{plan.name}] {elapsed:5.1f}s / {plan.duration:.0f}s  "
            f"{done:>9} requests  {done / elapsed if elapsed else 0:>9.0f}/s"
        )
        end_char = "\r" if sys.stderr.isatty() else "\n"
        print(line, end=end_char, file=sys.stderr, flush=True)
    if enabled and sys.stderr.isatty():
        print(file=sys.stderr)
