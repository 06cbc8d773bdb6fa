"""`authsvc serve` as a child process, started and found by the banner it prints: the one
way the load runs, the soak and the tests start a real server (one place reads the
"authsvc serving on HOST:PORT" and "metrics on http://HOST:PORT/metrics" lines)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

import psutil

from service.processes import die_with_parent

SERVING_RE = re.compile(r"authsvc serving on (\S+):(\d+)")
METRICS_RE = re.compile(r"metrics on http://(\S+):(\d+)/metrics")

Stderr: TypeAlias = Path | int | None
"""Where the server's stderr goes: a file (appended to), subprocess.DEVNULL or
subprocess.STDOUT (merged into the output the banner is read from), or None (ours)."""


class ServerDidNotStart(RuntimeError):
    """`authsvc serve` exited, or printed no address in time; the message ends with what
    it printed."""


@dataclass(frozen=True)
class ServeCommand:
    """How to start `authsvc serve`: what the callers differ in."""

    env: Mapping[str, str]
    """The whole environment (AUTH_LISTEN, AUTH_DATA_DIR or AUTH_DATABASE_URL, ...)."""
    workers: int | None = None
    """`--workers N`; None leaves the flag out (AUTH_WORKERS or the default applies)."""
    stderr: Stderr = subprocess.DEVNULL
    cwd: Path | None = None
    new_session: bool = False
    """Start it in a session (and process group) of its own, so a test can signal the
    whole group as a terminal does."""
    within: float = 60.0
    """Seconds to wait for its address."""
    die_with_parent: bool = False
    """SIGTERM to it (a graceful stop) when the process that started it dies, even by
    SIGKILL: a load run or bench that is killed leaves no server behind. Linux; start it
    from the main thread (the signal follows the thread that started it)."""

    def argv(self) -> list[str]:
        workers = [] if self.workers is None else ["--workers", str(self.workers)]
        return [sys.executable, "-m", "service", "serve", *workers]

    def start(self) -> ServerProcess:
        """Start it and wait for its address; ServerDidNotStart (the process killed) if it
        exits first or prints none within `within` seconds."""
        if isinstance(self.stderr, Path):
            with self.stderr.open("a") as log_file:  # the child keeps its own descriptor
                process = self._popen(log_file.fileno())
        else:
            process = self._popen(self.stderr)
        server = ServerProcess(command=self, process=process)
        try:
            server._read_banner()
        except BaseException:
            server.kill()
            raise
        return server

    def _popen(self, stderr: int | None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(),
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=self.cwd,
            start_new_session=self.new_session,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )


@dataclass
class ServerProcess:
    """A started `authsvc serve`. Its output is read on a thread of its own after the
    banner (into `output`), so a full pipe never blocks the server."""

    command: ServeCommand
    process: subprocess.Popen[str]
    host: str = ""
    port: int = 0
    metrics_port: int | None = None
    """Set when the server printed a metrics address before its serving line."""
    metrics_host: str = ""
    output: list[str] = field(default_factory=list)
    """Every line of its stdout (and stderr when merged) read so far."""
    killed: bool = False
    """`kill` ended it."""
    _reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        """HOST:PORT, as the server printed it."""
        return f"{self.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """HOST:PORT of its metrics endpoint."""
        if self.metrics_port is None:
            raise ValueError("the server printed no metrics address (AUTH_METRICS_LISTEN unset)")
        return f"{self.metrics_host}:{self.metrics_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_banner(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + self.command.within
        while time.monotonic() < deadline:
            line = stdout.readline()
            if not line:
                break
            self.output.append(line)
            if found := METRICS_RE.search(line):
                self.metrics_host, self.metrics_port = found.group(1), int(found.group(2))
            if found := SERVING_RE.search(line):
                self.host, self.port = found.group(1), int(found.group(2))
                self._reader = threading.Thread(
                    target=self._read_rest, name=f"serve-{self.pid}-output", daemon=True
                )
                self._reader.start()
                return
        raise ServerDidNotStart(
            f"authsvc serve did not start ({self._how_it_ended()}):\n" + "".join(self.output[-40:])
        )

    def _how_it_ended(self) -> str:
        """Its exit status, for a start that failed: a signal says someone stopped it."""
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"still running, no address after {self.command.within:g} s"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"ended by {signal.Signals(-code).name}"
            return f"ended by signal {-code}"
        return f"exit code {code}"

    def _read_rest(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            self.output.append(line)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (unless it has exited), wait up to `timeout` s, SIGKILL past that; its
        exit code (negative: the signal that ended it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self._finished()

    def kill(self) -> int:
        """SIGKILL to it and its workers (unless it has exited): they die as on a host
        failure, without a drain. (Killed alone, the supervisor's death would send its
        workers SIGTERM, and they would drain. Its embedded PostgreSQL is left to the next
        start to adopt, as a killed supervisor leaves it.)"""
        if self.process.poll() is None:
            workers = []
            with contextlib.suppress(psutil.Error):
                workers = [
                    child
                    for child in psutil.Process(self.process.pid).children()
                    if "--worker" in child.cmdline()
                ]
            self.process.kill()
            for worker in workers:
                with contextlib.suppress(psutil.Error):
                    worker.kill()
            self.process.wait()
            self.killed = True
        return self._finished()

    def _finished(self) -> int:
        if self._reader is not None:
            self._reader.join(timeout=5)
        code = self.process.returncode
        assert code is not None
        return code


@contextmanager
def serving(
    command: ServeCommand, *, at_end: Literal["stop", "stop_cleanly", "kill"] = "stop"
) -> Iterator[ServerProcess]:
    """The server for the block. At its end, if still running: "stop" (SIGTERM, SIGKILL
    after 30 s), "stop_cleanly" (SIGTERM, and fail unless it exits with 0 within 30 s, or
    the block killed it) or "kill". A block that raises stops it ("stop") or kills it."""
    server = command.start()
    try:
        yield server
    except BaseException:
        # "stop" lets it stop its embedded PostgreSQL even then.
        server.stop() if at_end == "stop" else server.kill()
        raise
    if at_end == "kill":
        server.kill()
        return
    code = server.stop()
    if at_end == "stop_cleanly" and not server.killed and code != 0:
        tail = "".join(server.output[-20:])
        raise AssertionError(f"authsvc serve did not exit cleanly on SIGTERM ({code}):\n{tail}")
