"""Real `authsvc serve` replicas for the balancing tests: separate processes on one
database, each with its own metrics endpoint, so a test can count which replica answered
and kill one outright."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from authsvc_client.client import AuthClient, AuthServiceError
from prometheus_client.parser import text_string_to_metric_families

from service.loadtest.server_process import ServeCommand, ServerProcess, serving

VALIDATE = "/auth.v1.AuthService/Validate"


@dataclass
class Replica:
    """One `authsvc serve` process (one worker) listening on 127.0.0.1."""

    server: ServerProcess

    @property
    def process(self) -> subprocess.Popen[str]:
        return self.server.process

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.target

    @property
    def metrics_address(self) -> str:
        return self.server.metrics_address

    def calls(self, method: str = VALIDATE, code: str = "OK") -> float:
        """How many calls of `method` this replica answered with `code` (its metrics)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "authsvc_rpc_calls_total"
                    and sample.labels.get("method") == method
                    and sample.labels.get("code") == code
                ):
                    return sample.value
        return 0.0

    def kill(self) -> None:
        """SIGKILL: the replica dies mid-call, as on a host failure (no drain)."""
        self.server.kill()


@contextmanager
def replica(env: dict[str, str]) -> Iterator[Replica]:
    """Start `authsvc serve` with `env` (plus a metrics endpoint on a free loopback port);
    stop it with SIGTERM at the end (it must exit with 0) unless the test killed it."""
    env = {**env, "AUTH_WORKERS": "1", "AUTH_METRICS_LISTEN": "127.0.0.1:0"}
    with serving(ServeCommand(env), at_end="stop_cleanly") as server:
        if server.metrics_port is None:
            raise AssertionError("replica printed no metrics address")
        yield Replica(server)


@contextmanager
def replicas(env: dict[str, str], count: int) -> Iterator[list[Replica]]:
    with ExitStack() as stack:
        yield [stack.enter_context(replica(env)) for _ in range(count)]


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, for a program that cannot listen on port 0 and tell
    (nginx)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LoadResult:
    """What a validate load saw: calls that succeeded, calls that failed (by code and
    reason), and calls made after the `midway` action ran."""

    succeeded: int = 0
    failures: list[str] = field(default_factory=list)
    succeeded_after_midway: int = 0


async def validate_load(
    auth: AuthClient,
    token: str,
    *,
    concurrency: int,
    before: float,
    after: float,
    midway: Callable[[], Awaitable[None]] | None = None,
) -> LoadResult:
    """`concurrency` loops of Validate for `before` seconds, then `midway()` (a replica's
    death) while the loops go on, then `after` more seconds. Bounded in time, loopback only."""
    result = LoadResult()
    stop = asyncio.Event()
    midway_done = False

    async def loop() -> None:
        while not stop.is_set():
            try:
                verdict = await auth.validate(token)
            except AuthServiceError as error:
                result.failures.append(f"{error.code.name}:{error.reason}:{error.message}")
                continue
            if not verdict.valid:
                result.failures.append(f"not valid: {verdict.error}")
                continue
            result.succeeded += 1
            if midway_done:
                result.succeeded_after_midway += 1

    tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(before)
        if midway is not None:
            await midway()
        midway_done = True
        await asyncio.sleep(after)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return result
