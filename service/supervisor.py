"""`authsvc serve`: N server processes (one or more) on one port, one command for the operator.

The supervisor itself creates no gRPC object: it prepares the database (starts
the embedded PostgreSQL if configured so, applies migrations, opens or creates the key
material, so that a wrong KEK is its one line rather than every worker's), then starts N
worker processes that each run their own event loop, pool, revocation listener
and gRPC server bound with SO_REUSEPORT, so the kernel spreads connections over
them. It restarts a worker that dies, replaces one that stops beating or outgrows
AUTH_WORKER_MAX_MEMORY (a lone worker too: `serve --workers 1` is one supervisor and one
worker), and turns SIGTERM, SIGINT or SIGQUIT into a graceful stop of every worker (SIGHUP
is ignored, see `service.cli`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from authsvc_client.addresses import HostPort

from service.app import READY_FD_VARIABLE, STOP_SIGNALS, print_banner
from service.components import key_encryption_key, prepare_key_material, start_database_clock
from service.database import open_database
from service.domain.shared_settings import agree_on_shared_settings, check_shared_settings
from service.failures import EXIT_INTERNAL, ConfigurationError, StartupError
from service.metrics import (
    MULTIPROC_DIR_VARIABLE,
    MetricsEndpoint,
    OwnedMultiprocessDir,
    multiprocess_registry,
    worker_exited,
)
from service.processes import die_with_parent
from service.settings import Settings
from service.startup_checks import service_directory, start_metrics_endpoint
from service.store import PostgresStore

log = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_RESTART_BACKOFF_MAX = 10.0
# How often the workers' heartbeats and resident memory (against AUTH_WORKER_MAX_MEMORY)
# are read, and the multiple of that limit past which a worker being replaced is killed
# instead of left to drain. Often: what grows a worker below our code (gRPC core's HPACK
# bomb) can add 400-600 MiB a second, and the later it is seen the further past the limit.
_WORKER_CHECK_INTERVAL = 0.2
_KILL_PAST = 1.5
# Seconds without a heartbeat (a worker beats every second from its event loop) after
# which a worker is taken for stuck and killed.
_SILENT_AFTER = 10.0


async def _prepare_database(settings: Settings) -> tuple[str, bool]:
    """Migrate, record or compare the shared settings, then open (or, on first start,
    create) the key material once, so that settings another replica does not share, or a
    wrong or missing KEK, stop the supervisor with one line instead of every worker.
    Returns the database's URL and whether it has a user (for the banner)."""
    async with open_database(settings, migrate=True) as database:
        store = PostgresStore(database.pool, timeout=settings.db_timeout)
        await check_shared_settings(store, settings)
        # Refused here, in one line, rather than by every worker (each checks again).
        clock = await start_database_clock(settings, database.pool)
        await prepare_key_material(settings, database.pool, clock)
        await agree_on_shared_settings(store, settings, clock=clock)
        has_users = await store.has_live_users()
    return database.dsn, has_users


def _reserve_port(listen: str) -> tuple[HostPort, socket.socket]:
    """Resolve port 0 to a concrete free port and hold it with SO_REUSEPORT.

    A port held by something else (another server without SO_REUSEPORT, or
    another authsvc) is refused here, instead of silently shared. A port whose only
    sockets are an earlier server's closing connections (TIME_WAIT, after a restart) is
    taken, as gRPC's own bind (SO_REUSEADDR) would.
    """
    address = HostPort.parse(listen)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((address.host, address.port))  # no SO_REUSEPORT: fails if anyone holds it
        port = probe.getsockname()[1]
    except OSError as exc:
        raise ConfigurationError(
            f"AUTH_LISTEN: cannot listen on {listen} ({exc.strerror})"
        ) from None
    finally:
        probe.close()
    # Without SO_REUSEADDR: another authsvc's probe is refused by this hold even before
    # our workers listen. Bound, never listening: it receives no connections.
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((address.host, port))
    except OSError:
        # The probe found the port free, so what is there is a closing connection (TIME_WAIT)
        # of a socket without SO_REUSEPORT, which only SO_REUSEADDR binds beside. Held so,
        # another authsvc's probe is refused only once our workers listen.
        holder.close()
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind((address.host, port))
        except OSError as exc:
            holder.close()
            raise ConfigurationError(
                f"AUTH_LISTEN: cannot listen on {listen} ({exc.strerror})"
            ) from None
    return address.with_port(port), holder


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_read: int
    started_at: float = field(default_factory=time.monotonic)
    replacement: _Worker | None = None
    """Set when it is over its memory: the worker started beside it to take its place."""
    stop_sent_at: float | None = None
    """When a retiring worker was told to stop (once its replacement serves)."""
    ready: bool = False
    """It said it serves (then its pipe carries heartbeats)."""
    last_heard: float = field(default_factory=time.monotonic)
    """When its last heartbeat (or its ready byte) was read."""


class WorkerSupervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int,
        dsn: str,
        address: HostPort,
        metrics_dir: Path | None = None,
        metrics_address: HostPort | None = None,
    ):
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._metrics_address = metrics_address
        self._count = workers
        self._dsn = dsn
        self._address = address
        self._workers: dict[int, _Worker] = {}
        self._retiring: list[_Worker] = []
        """Told to stop for their memory, draining beside their replacements."""
        self._stopping = False
        self.restarts = 0

    def _spawn(self, index: int) -> _Worker:
        ready_read, ready_write = os.pipe()
        env = dict(os.environ)
        env["AUTH_DATABASE_URL"] = self._dsn
        env["AUTH_LISTEN"] = str(self._address)
        env["AUTH_WORKERS"] = str(self._count)
        env[READY_FD_VARIABLE] = str(ready_write)
        if self._metrics_dir is not None:
            # Set before the worker's interpreter starts, so its prometheus_client writes
            # the shared files the supervisor's /metrics sums.
            env[MULTIPROC_DIR_VARIABLE] = str(self._metrics_dir)
        if self._metrics_address is not None:
            # What the worker's start-up line names (it binds nothing: we serve /metrics),
            # the port bound rather than the 0 asked for, like AUTH_LISTEN above.
            env["AUTH_METRICS_LISTEN"] = str(self._metrics_address)
        # Workers get the database's URL (also the embedded one's): with it they need
        # AUTH_KEK, which the supervisor read from its KEK file if it was not set.
        env["AUTH_KEK"] = base64.b64encode(key_encryption_key(self._settings)).decode()
        env["AUTH_DATA_DIR"] = str(self._settings.data_dir.resolve())
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--worker"],
            env=env,
            pass_fds=(ready_write,),
            preexec_fn=die_with_parent,  # no orphaned worker keeps serving the port
        )
        os.close(ready_write)
        # Read without waiting (`_wait_ready` selects first): a replacement started beside a
        # retiring worker is heard by the periodic check, not waited for.
        os.set_blocking(ready_read, False)
        return _Worker(index=index, process=process, ready_read=ready_read)

    def _wait_ready(self, worker: _Worker, deadline: float) -> bool:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([worker.ready_read], [], [], 0.2)
            if readable:
                # Kept open for the heartbeats that follow.
                worker.ready = os.read(worker.ready_read, 1) == b"r"
                worker.last_heard = time.monotonic()
                return worker.ready
            if worker.process.poll() is not None:
                break
        return False

    def start(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        for index in range(self._count):
            self._workers[index] = self._spawn(index)
        for worker in self._workers.values():
            if not self._wait_ready(worker, deadline):
                code = worker.process.poll()
                self.stop(grace=1.0)
                # Its own line above says why; its exit code is ours.
                raise StartupError(
                    f"worker {worker.index} did not start (exit code {code}); see its line above",
                    exit_code=code if code is not None and 0 < code < 128 else EXIT_INTERNAL,
                )

    def watch(self, stop_requested: list[bool]) -> None:
        """Restart workers that die, retire those past AUTH_WORKER_MAX_MEMORY and kill
        those whose heartbeat stopped, until a stop is requested."""
        backoff = 0.5
        next_worker_check = 0.0
        while not stop_requested[0]:
            time.sleep(0.2)
            if time.monotonic() >= next_worker_check:
                next_worker_check = time.monotonic() + _WORKER_CHECK_INTERVAL
                self._kill_the_silent()
                self._retire_the_overgrown()
                self._follow_the_retiring()
            for index, worker in list(self._workers.items()):
                code = worker.process.poll()
                if code is None or stop_requested[0]:
                    continue
                log.warning(
                    "worker %d (pid %d) exited with %s; restarting", index, worker.process.pid, code
                )
                self._forget(worker)
                # A worker that dies at once is crash-looping: slow the restarts down.
                if time.monotonic() - worker.started_at < 5.0:
                    time.sleep(backoff)
                    backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)
                else:
                    backoff = 0.5
                replacement = self._spawn(index)
                self._workers[index] = replacement
                self.restarts += 1
                if not self._wait_ready(replacement, time.monotonic() + _START_TIMEOUT):
                    log.warning("restarted worker %d is not ready yet", index)

    def _kill_the_silent(self) -> None:
        """SIGKILL to each worker whose heartbeats stopped for `_SILENT_AFTER` seconds (its
        event loop no longer turns: stopped, deadlocked, pinned), or that did not say it
        serves within `_START_TIMEOUT`: the kernel still hands it connections, which would
        hang. `watch` starts its replacement."""
        now = time.monotonic()
        for index, worker in self._workers.items():
            if worker.process.poll() is not None:
                continue
            with contextlib.suppress(BlockingIOError):
                heard = os.read(worker.ready_read, 4096)
                if heard and not worker.ready:
                    worker.ready = heard[:1] == b"r"  # a replacement's first byte
                if heard:
                    worker.last_heard = now
            if not worker.ready:
                if now - worker.started_at > _START_TIMEOUT:
                    log.warning(
                        "worker %d (pid %d) did not start in %.0f s: killing it",
                        index,
                        worker.process.pid,
                        _START_TIMEOUT,
                    )
                    worker.process.kill()
                continue
            if now - worker.last_heard > _SILENT_AFTER:
                log.warning(
                    "worker %d (pid %d) sent no heartbeat for %.0f s: killing it",
                    index,
                    worker.process.pid,
                    now - worker.last_heard,
                )
                worker.process.kill()

    def _retire_the_overgrown(self) -> None:
        """Replace each worker whose resident memory passed AUTH_WORKER_MAX_MEMORY: its
        replacement starts at once, beside it, and once that serves it gets SIGTERM,
        drains its calls and exits (`_follow_the_retiring`): even a lone worker's port is
        never without a listener."""
        limit_mib = self._settings.worker_max_memory
        if not limit_mib:
            return
        for index, worker in list(self._workers.items()):
            if worker.process.poll() is not None:
                continue  # `watch` restarts it
            try:
                rss = psutil.Process(worker.process.pid).memory_info().rss
            except psutil.Error:
                continue  # gone meanwhile: `watch` sees it
            if rss > limit_mib * 1024 * 1024:
                log.warning(
                    "worker %d (pid %d) holds %d MiB, over AUTH_WORKER_MAX_MEMORY=%d: replacing it",
                    index,
                    worker.process.pid,
                    rss // (1024 * 1024),
                    limit_mib,
                )
                worker.replacement = self._spawn(index)
                self._workers[index] = worker.replacement
                self._retiring.append(worker)
                self.restarts += 1

    def _follow_the_retiring(self) -> None:
        """SIGTERM to each retiring worker once its replacement serves (or is gone or
        late: then the memory matters more); forget it once it exited. SIGKILL one that
        grows past `_KILL_PAST` times AUTH_WORKER_MAX_MEMORY meanwhile (what grows it may
        still be sending: its calls' grace is not worth the machine's memory) or that is
        still there well after its grace."""
        limit = _KILL_PAST * self._settings.worker_max_memory * 1024 * 1024
        overdue = self._settings.shutdown_grace + 10.0
        now = time.monotonic()
        for worker in list(self._retiring):
            if worker.process.poll() is not None:
                self._retiring.remove(worker)
                self._forget(worker)
                continue
            replacement = worker.replacement
            if worker.stop_sent_at is None and (
                replacement is None
                or replacement.ready
                or replacement.process.poll() is not None
                or now - replacement.started_at > _START_TIMEOUT
            ):
                worker.stop_sent_at = now
                worker.process.send_signal(signal.SIGTERM)
            try:
                rss = psutil.Process(worker.process.pid).memory_info().rss
            except psutil.Error:
                continue  # gone meanwhile: seen next time
            late = worker.stop_sent_at is not None and now - worker.stop_sent_at > overdue
            if rss > limit or late:
                log.warning(
                    "worker %d (pid %d) %s: killing it",
                    worker.index,
                    worker.process.pid,
                    f"still there {overdue:.0f} s after it was told to stop"
                    if late
                    else f"grew to {rss // (1024 * 1024)} MiB, past {_KILL_PAST} x "
                    "AUTH_WORKER_MAX_MEMORY, while being replaced",
                )
                worker.process.kill()

    def stop(self, grace: float) -> None:
        """SIGTERM every worker, wait for the graceful stop, then kill stragglers."""
        every = [*self._workers.values(), *self._retiring]
        for worker in every:
            if worker.process.poll() is None and worker.stop_sent_at is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5.0
        for worker in every:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.wait()
            self._forget(worker)
        self._retiring.clear()

    def _forget(self, worker: _Worker) -> None:
        """An exited worker: its pipe closed, its gauges out of the totals (its counters
        stay counted)."""
        with contextlib.suppress(OSError):
            os.close(worker.ready_read)
        if self._metrics_dir is not None:
            worker_exited(worker.process.pid, self._metrics_dir)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values()]


def run_supervisor(settings: Settings, workers: int) -> int:
    """The `serve` parent, with one worker or several: returns the process exit code."""
    # A file every worker would fail on, checked once here first (TLS files were checked
    # readable with the settings; their contents only gRPC reads, in the workers).
    if settings.caller_auth:
        service_directory(settings)
    key_encryption_key(settings)  # a missing AUTH_KEK stops us before the database is touched
    # The ports too: a second server on them is refused before it migrates or writes
    # anything (and before an unreachable database could hide why).
    address, holder = _reserve_port(settings.listen)
    metrics_dir: OwnedMultiprocessDir | None = None
    endpoint: MetricsEndpoint | None = None
    try:
        if settings.metrics_listen is not None:
            metrics_dir = OwnedMultiprocessDir.create()
            endpoint = start_metrics_endpoint(
                settings.metrics_listen, multiprocess_registry(metrics_dir.path)
            )
        dsn, has_users = asyncio.run(_prepare_database(settings))
        stop_requested = [False]

        def request_stop(_signum: int, _frame: object) -> None:
            stop_requested[0] = True

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        supervisor = WorkerSupervisor(
            settings,
            workers=workers,
            dsn=dsn,
            address=address,
            metrics_dir=None if metrics_dir is None else metrics_dir.path,
            metrics_address=None if endpoint is None else endpoint.address,
        )
        supervisor.start()
        print_banner(
            settings,
            str(address),
            workers=workers,
            metrics=None if endpoint is None else str(endpoint.address),
            has_users=has_users,
        )
        supervisor.watch(stop_requested)
        log.info(
            "stopping %d worker%s: in-flight calls get %.1fs",
            workers,
            "s" if workers != 1 else "",
            settings.shutdown_grace,
        )
        supervisor.stop(settings.shutdown_grace)
    finally:
        holder.close()
        if endpoint is not None:
            endpoint.close()
        if metrics_dir is not None:
            metrics_dir.remove()
    return 0
