"""The soak's watchers (`service.loadtest.soak`): "no loss" under disconnects and restarts.

Beside the soak's load and faults, in a thread of its own event loop:

- `WATCHERS` LocalValidators (the client package's), each behind a loopback TCP proxy of
  its own, half of them on the soak's `serve --workers N` server, half on a second replica
  process on the same database. Cutting a proxy's connections is a dropped network path:
  the validator reconnects and resumes by itself. Some are also closed and started again
  from scratch (a new snapshot).
- Chaos at random moments: watcher connections cut, watchers restarted from scratch, a
  feed's LISTEN connection killed (`pg_terminate_backend` on a backend whose
  application_name is LISTENER_APPLICATION_NAME), the second replica restarted.
- A revoker that revokes sessions every way there is (Revoke by refresh token, access token,
  session id and subject; admin RevokeSession and DisableUser), through either replica,
  and records when each call returned; the reuse attacker's revocations count too.
- A checker: once `revoked_at + BOUND` has passed, every watcher's `validate()` of the
  revoked session's access token must not answer valid (VERIFIER_STALE is not valid); it
  asks again at random later, so a revocation lost afterwards is caught too.
- At the end, after a settle period: every watcher holds exactly the revoked sessions and
  users the database's revocation log holds (ids, generations and keep_until), at the log's
  head; and the log agrees with the sessions and users tables.

BOUND: a LocalValidator's answer from memory reflects every revocation authsvc had logged
`max_staleness` seconds before it, plus authsvc's own lag (docs/clients.md, "Guarantees");
that lag is about a second on every replica, also right after its listener is killed
(docs/design.md, "Validate at scale"). So BOUND = WATCHER_MAX_STALENESS + SERVER_LAG. While
PostgreSQL is down no replica can read the log (by design: Validate answers from memory
meanwhile), so a revocation near an outage is due BOUND after the outage ended plus the
listener's largest reconnect backoff.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from authsvc_client.local_validator import LocalValidator

from service.loadtest.freshness import LISTENERS_SQL
from service.loadtest.reuse_attack import CALL_TIMEOUT, Attack, AttackLog, code_and_reason
from service.loadtest.server_process import ServeCommand, ServerDidNotStart, ServerProcess
from service.secrets_box import load_or_create_kek_file
from service.store.revocation_feed import LISTENER_APPLICATION_NAME

WATCHERS = 4
WATCHER_MAX_STALENESS = 2.0  # seconds: the watchers' max_staleness
SERVER_LAG = 1.0  # seconds for a revocation to reach every replica's memory (design.md)
BOUND = WATCHER_MAX_STALENESS + SERVER_LAG
LISTENER_MAX_BACKOFF = 2.0  # the feed's listener reconnects with backoff up to this
REVOKE_INTERVAL = 0.4  # seconds between the revoker's rounds (each is a login, then a revoke)
CHAOS_INTERVAL = (1.0, 3.0)  # seconds between two chaos actions, uniformly
REPLICA_RESTARTS_AT = (0.35, 0.8)  # fractions of the run
CHECK_INTERVAL = 0.2  # seconds between checker passes
RECHECKS_PER_PASS = 32  # matured revocations asked again at random each pass
SETTLE = 3.0  # seconds after the load stops before the final comparison
CATCH_UP_WITHIN = 20.0  # seconds for every watcher to be fresh and at the log's head
REVOKER_USERS = 4
REVOKE_KINDS = (
    "refresh_token",
    "access_token",
    "session_id",
    "subject",
    "admin_revoke_session",
    "admin_disable_user",
)
# What a disruption does to a call in flight (a replica stopping cancels the calls still
# running when its grace ends: CANCELLED); the call may or may not have taken effect, and
# the final comparison with the database covers it either way.
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
_PROBLEMS_SHOWN = 5  # example ids per difference in a failure line


@dataclass
class Revoked:
    """One revocation the checker follows: `access_token` must stop validating."""

    kind: str
    session_id: str
    access_token: str
    returned_at: float  # time.monotonic() when the revoking call returned
    checked: bool = False


@dataclass
class WatchLog:
    """What the watch part of the soak did and saw."""

    revocations: Counter[str] = field(default_factory=Counter)  # kind -> count
    revoke_errors: Counter[str] = field(default_factory=Counter)  # status code name -> count
    revokes_abandoned: int = 0  # gave up while the server was unreachable
    revokes_unconfirmed: int = 0  # retried after a lost answer: not followed for the bound
    revoker_anomalies: list[str] = field(default_factory=list)
    watcher_disconnects: int = 0  # proxy cuts that closed at least one connection
    connections_cut: int = 0
    watcher_restarts: int = 0  # closed and started again from scratch
    listener_kills: int = 0
    replica_restarts: int = 0
    checks: int = 0  # validate() calls on revoked tokens past their bound
    answers: Counter[str] = field(default_factory=Counter)  # error name of those answers
    violations: list[str] = field(default_factory=list)
    final_differences: list[str] = field(default_factory=list)
    watchers_final: list[dict[str, object]] = field(default_factory=list)
    database_final: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the harness itself went wrong
    events: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "bound_seconds": BOUND,
            "watchers": WATCHERS,
            "revocations": dict(self.revocations),
            "revocations_total": sum(self.revocations.values()),
            "revoke_errors": dict(self.revoke_errors),
            "revokes_abandoned": self.revokes_abandoned,
            "revokes_unconfirmed": self.revokes_unconfirmed,
            "revoker_anomalies": self.revoker_anomalies,
            "watcher_disconnects": self.watcher_disconnects,
            "connections_cut": self.connections_cut,
            "watcher_restarts": self.watcher_restarts,
            "listener_kills": self.listener_kills,
            "replica_restarts": self.replica_restarts,
            "checks": self.checks,
            "answers": dict(self.answers),
            "violations": self.violations,
            "final_differences": self.final_differences,
            "watchers_final": self.watchers_final,
            "database_final": self.database_final,
            "problems": self.problems,
        }


class CuttableProxy:
    """A loopback TCP proxy to one authsvc address. `cut()` closes every connection through
    it, as a dropped network path would; `upstream` may change (a replica restarted)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Connection handlers, awaited at close: a handler still running when the loop
        # ends is cancelled, and Python 3.11's start_server then logs a traceback for it.
        self._handlers: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        host, _, port = self.upstream.rpartition(":")
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), timeout=5
            )
        except (OSError, TimeoutError):
            client_w.close()
            return
        pair = {client_w, server_w}
        self._writers |= pair
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            self._writers -= pair
            for writer in pair:
                writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> int:
        """Close every connection through the proxy; how many sockets were closed."""
        writers = list(self._writers)
        for writer in writers:
            transport = writer.transport
            transport.abort()
        return len(writers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


class ReplicaProcess:
    """A second `authsvc serve` (one worker) on the soak server's database."""

    def __init__(self, dsn: str, data_dir: Path, log_dir: Path) -> None:
        kek = load_or_create_kek_file(data_dir / "kek")  # the soak server's: it exists
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
        self._env.update(
            {
                "AUTH_DATABASE_URL": dsn,
                "AUTH_KEK": base64.b64encode(kek).decode(),
                "AUTH_DATA_DIR": str(log_dir),
                "AUTH_LISTEN": "127.0.0.1:0",
                "AUTH_WORKERS": "1",
                "AUTH_REFRESH_REUSE_GRACE": "0",
                "AUTH_MAX_SESSIONS_PER_USER": "10000",
            }
        )
        self._log_path = log_dir / "replica.log"
        self._server: ServerProcess | None = None
        self.address = ""

    def start(self, within: float = 60.0) -> str:
        """Start it (again on the port it had, so its clients' addresses stay right)."""
        self._env["AUTH_LISTEN"] = self.address or "127.0.0.1:0"
        command = ServeCommand(self._env, stderr=self._log_path, within=within)
        try:
            self._server = command.start()
        except ServerDidNotStart:
            raise RuntimeError(
                f"the second replica did not start (log: {self._log_path})"
            ) from None
        self.address = self._server.target
        return self.address

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()


class Watcher:
    """A LocalValidator behind its own proxy, which can be cut or started from scratch."""

    def __init__(self, name: str, proxy: CuttableProxy) -> None:
        self.name = name
        self.proxy = proxy
        self.validator = self._new()
        self.generations = 1  # validators this watcher has had

    def _new(self) -> LocalValidator:
        return LocalValidator(self.proxy.address, max_staleness=WATCHER_MAX_STALENESS)

    async def restart_from_scratch(self) -> None:
        old, self.validator = self.validator, self._new()
        await old.close()
        self.generations += 1
        self.validator.start_in_background()

    def held(self) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
        """The revoked sessions and users it holds (copies; read on the loop's thread)."""
        return self.validator.held()


class Outages:
    """PostgreSQL outages (monotonic start, end or None while it lasts), as the soak's
    fault thread reports them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[list[float | None]] = []

    def begin(self, at: float) -> None:
        with self._lock:
            self._spans.append([at, None])

    def end(self, at: float) -> None:
        with self._lock:
            if self._spans and self._spans[-1][1] is None:
                self._spans[-1][1] = at

    def due(self, returned_at: float) -> float | None:
        """When a revocation that returned at `returned_at` must be seen everywhere (None:
        not yet known, PostgreSQL is down)."""
        due = returned_at + BOUND
        with self._lock:
            spans = [tuple(s) for s in self._spans]
        changed = True
        while changed:
            changed = False
            for start, end in spans:
                assert start is not None
                if start <= due and (end is None or end >= returned_at - SERVER_LAG):
                    if end is None:
                        return None
                    later = end + LISTENER_MAX_BACKOFF + BOUND
                    if later > due:
                        due, changed = later, True
        return due


def _subject(access_token: str) -> str:
    claims: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    return str(claims["sub"])


def _bearer(access_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {access_token}"),)


class WatchSoak:
    """Runs in a thread of its own: `start()`, then `finish()` once the load stopped.
    (In a process of its own, `WatchProcess`: grpc.aio must not run in the soak's process,
    whose pg_ctl forks would crash.)"""

    def __init__(
        self,
        *,
        target: str,
        dsn: str,
        data_dir: Path,
        scratch_dir: Path,
        usernames: tuple[str, ...],
        password: str,
        attacks: AttackLog,
        outages: Outages,
        duration: float,
        event: Callable[[str], None],
        seed: int | None = None,
    ) -> None:
        self.target = target
        self.dsn = dsn
        self.usernames = usernames
        self.password = password
        self.attacks = attacks
        self.outages = outages
        self.duration = duration
        self._event = event
        self.seed = seed if seed is not None else random.randrange(2**32)
        self.rng = random.Random(self.seed)
        self.log = WatchLog()
        self.replica = ReplicaProcess(dsn, data_dir, scratch_dir)
        self._stop_chaos = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._followed: list[Revoked] = []
        self._attacks_seen = 0
        self._last_call_retried = False
        self.proxies: list[CuttableProxy] = []
        self.watchers: list[Watcher] = []
        self._channels: dict[str, grpc.aio.Channel] = {}

    # --- the thread ---------------------------------------------------------------------

    def start(self, within: float = 90.0) -> None:
        """Start the second replica and the watchers; return once every watcher has its
        first snapshot (or record why not)."""
        self._thread = threading.Thread(target=self._run, name="soak-watchers", daemon=True)
        self._thread.start()
        if not self._ready.wait(within):
            self.log.problems.append(f"the watchers did not start within {within:.0f}s")

    def finish(self, within: float = 120.0) -> WatchLog:
        """Stop the chaos and the revoker, settle, compare; the log of it all."""
        self._stop_chaos.set()
        if self._thread is not None:
            self._thread.join(within)
            if self._thread.is_alive():
                self.log.problems.append("the watch part did not finish in time")
        return self.log

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            self.log.problems.append(f"the watch part failed: {type(exc).__name__}: {exc}")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                self.replica.stop()

    async def _main(self) -> None:
        replica_address = await asyncio.to_thread(self.replica.start)
        self._event(f"second replica on {replica_address}")
        upstreams = [self.target if i % 2 == 0 else replica_address for i in range(WATCHERS)]
        proxies = [CuttableProxy(u) for u in upstreams]
        for proxy in proxies:
            await proxy.start()
        self.proxies = proxies
        watchers = [Watcher(f"w{i}", proxies[i]) for i in range(WATCHERS)]
        self.watchers = watchers
        try:
            await asyncio.gather(*(w.validator.start(timeout=30) for w in watchers))
            self._event(
                f"{WATCHERS} watchers following (seed {self.seed}; bound {BOUND:.1f}s after "
                "each revocation returned)"
            )
            self._ready.set()
            started = time.monotonic()
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(self._chaos(started, stop)),
                asyncio.create_task(self._revoker(stop)),
                asyncio.create_task(self._checker(stop)),
            ]
            await asyncio.to_thread(self._stop_chaos.wait)
            stop.set()
            for task in tasks:
                try:
                    await task
                except Exception as exc:
                    self.log.problems.append(
                        f"{task.get_name()} failed: {type(exc).__name__}: {exc}"
                    )
            self._event(f"watchers: chaos stopped; settling {SETTLE:.0f}s")
            await asyncio.sleep(SETTLE)
            self._check_due(time.monotonic())
            await self._compare_with_database()
        finally:
            for watcher in watchers:
                with contextlib.suppress(Exception):
                    await watcher.validator.close()
            for proxy in proxies:
                await proxy.close()
            for channel in self._channels.values():
                await channel.close()

    # --- chaos --------------------------------------------------------------------------

    async def _chaos(self, started: float, stop: asyncio.Event) -> None:
        replica_restarts = [started + f * self.duration for f in REPLICA_RESTARTS_AT]
        # Each kind at least once, early; then at random.
        actions: list[str] = ["cut", "listener", "scratch"]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*CHAOS_INTERVAL))
            if stop.is_set():
                return
            if replica_restarts and time.monotonic() >= replica_restarts[0]:
                replica_restarts.pop(0)
                await self._restart_replica()
                continue
            action = (
                actions.pop(0)
                if actions
                else self.rng.choices(["cut", "listener", "scratch"], weights=[5, 3, 2])[0]
            )
            if action == "cut":
                self._cut_watchers()
            elif action == "listener":
                await self._kill_a_listener()
            else:
                watcher = self.rng.choice(self.watchers)
                await watcher.restart_from_scratch()
                self.log.watcher_restarts += 1
                self._event(f"watcher {watcher.name}: closed, started again from scratch")

    def _cut_watchers(self) -> None:
        chosen = self.rng.sample(self.watchers, self.rng.randint(1, len(self.watchers)))
        cut = sum(w.proxy.cut() for w in chosen)
        if cut:
            self.log.watcher_disconnects += 1
            self.log.connections_cut += cut
        names = ",".join(w.name for w in chosen)
        self._event(f"watchers {names}: connections cut ({cut} sockets)")

    async def _kill_a_listener(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self._event(f"listener kill skipped: database unreachable ({type(exc).__name__})")
            return
        try:
            pids = [r["pid"] for r in await conn.fetch(LISTENERS_SQL, LISTENER_APPLICATION_NAME)]
            if not pids:
                self._event("listener kill skipped: no listener connected")
                return
            pid = self.rng.choice(pids)
            if await conn.fetchval("SELECT pg_terminate_backend($1)", pid):
                self.log.listener_kills += 1
                self._event(f"listener backend {pid} terminated (of {len(pids)} listening)")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._event(f"listener kill failed: {type(exc).__name__}")
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def _restart_replica(self) -> None:
        self._event("second replica: SIGTERM")
        await asyncio.to_thread(self.replica.stop)
        for attempt in range(3):
            try:
                address = await asyncio.to_thread(self.replica.start)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
        for proxy in self.proxies:
            if proxy.upstream != self.target:
                proxy.upstream = address
        self.log.replica_restarts += 1
        self._event(f"second replica: started again on {address}")

    # --- revoking -----------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        """The main server or the second replica, at random (the replica's current address)."""
        address = self.replica.address if self.rng.random() < 0.5 else self.target
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    async def _call(self, stop: asyncio.Event, call: Callable[[], Any]) -> tuple[Any, bool]:
        """`call()` retried while the server is unreachable (as long as the run goes on);
        (its answer, whether it was retried). Raises grpc.RpcError for any other failure
        or when giving up."""
        retried = self._last_call_retried = False
        deadline = time.monotonic() + 3 * CALL_TIMEOUT
        while True:
            try:
                return await call(), retried
            except grpc.RpcError as error:
                code, _ = code_and_reason(error)
                self.log.revoke_errors[code] += 1
                if code not in _RETRYABLE or time.monotonic() > deadline or stop.is_set():
                    raise
                retried = self._last_call_retried = True
                await asyncio.sleep(0.2)

    async def _revoker(self, stop: asyncio.Event) -> None:
        round_ = 0
        while not stop.is_set():
            kind = REVOKE_KINDS[round_ % len(REVOKE_KINDS)]
            username = self.usernames[round_ % len(self.usernames)]
            round_ += 1
            try:
                await self._revoke_once(stop, kind, username)
            except grpc.RpcError as error:
                code, reason = code_and_reason(error)
                if code in _RETRYABLE:
                    self.log.revokes_abandoned += 1
                else:
                    self.log.revoker_anomalies.append(f"{kind}: {code} {reason}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REVOKE_INTERVAL)

    async def _revoke_once(self, stop: asyncio.Event, kind: str, username: str) -> None:
        channel = self._channel()
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        credentials = auth_pb2.PasswordCredentials(username=username, password=self.password)
        issued, _ = await self._call(
            stop,
            lambda: auth.Issue(auth_pb2.IssueRequest(password=credentials), timeout=CALL_TIMEOUT),
        )
        tokens = issued.tokens
        user = admin_pb2.UserSelector(username=username)
        requests: dict[str, Callable[[], Any]] = {
            "refresh_token": lambda: auth.Revoke(
                auth_pb2.RevokeRequest(refresh_token=tokens.refresh_token), timeout=CALL_TIMEOUT
            ),
            "access_token": lambda: auth.Revoke(
                auth_pb2.RevokeRequest(access_token=tokens.access_token), timeout=CALL_TIMEOUT
            ),
            "session_id": lambda: auth.Revoke(
                auth_pb2.RevokeRequest(session_id=tokens.session_id),
                metadata=_bearer(tokens.access_token),
                timeout=CALL_TIMEOUT,
            ),
            "subject": lambda: auth.Revoke(
                auth_pb2.RevokeRequest(subject=_subject(tokens.access_token)),
                metadata=_bearer(tokens.access_token),
                timeout=CALL_TIMEOUT,
            ),
            "admin_revoke_session": lambda: admin.RevokeSession(
                admin_pb2.RevokeSessionRequest(session_id=tokens.session_id),
                timeout=CALL_TIMEOUT,
            ),
            "admin_disable_user": lambda: admin.DisableUser(
                admin_pb2.DisableUserRequest(user=user), timeout=CALL_TIMEOUT
            ),
        }
        try:
            answer, retried = await self._call(stop, requests[kind])
        except grpc.RpcError as error:
            code, _ = code_and_reason(error)
            if self._last_call_retried and code not in _RETRYABLE:
                # It may fail for having succeeded before, its answer lost (the session
                # revoked, so its bearer token no longer live): the revocation may be in.
                self.log.revokes_unconfirmed += 1
                return
            raise
        returned_at = time.monotonic()
        if kind == "admin_disable_user":
            await self._call(
                stop,
                lambda: admin.EnableUser(
                    admin_pb2.EnableUserRequest(user=user), timeout=CALL_TIMEOUT
                ),
            )
        if not retried and answer.revoked_sessions < 1:
            self.log.revoker_anomalies.append(f"{kind}: revoked {answer.revoked_sessions}")
            return
        self.log.revocations[kind] += 1
        self._followed.append(Revoked(kind, tokens.session_id, tokens.access_token, returned_at))

    # --- checking -----------------------------------------------------------------------

    async def _checker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL)
            self._check_due(time.monotonic())

    def _take_attacks(self) -> None:
        attacks = self.attacks.attacks
        while self._attacks_seen < len(attacks):
            attack = attacks[self._attacks_seen]
            self._attacks_seen += 1
            self.log.revocations["reuse"] += 1
            self._followed.append(
                Revoked("reuse", attack.session_id, attack.access_token, attack.revoked_at)
            )

    def _check_due(self, now: float) -> None:
        """Ask every watcher about each revocation whose bound passed (once at its due time)
        and a random sample of the older ones again."""
        self._take_attacks()
        matured: list[Revoked] = []
        for revoked in self._followed:
            if revoked.checked:
                matured.append(revoked)
                continue
            due = self.outages.due(revoked.returned_at)
            if due is not None and due <= now:
                self._ask_watchers(revoked, now)
                revoked.checked = True
        if matured:
            for revoked in self.rng.sample(matured, min(RECHECKS_PER_PASS, len(matured))):
                self._ask_watchers(revoked, now)

    def _ask_watchers(self, revoked: Revoked, now: float) -> None:
        for watcher in self.watchers:
            answer = watcher.validator.validate(revoked.access_token)
            self.log.checks += 1
            self.log.answers[answer.error or "VALID"] += 1
            if answer.valid:
                self.log.violations.append(
                    f"watcher {watcher.name}: {revoked.kind}-revoked session "
                    f"{revoked.session_id} answered valid {now - revoked.returned_at:.1f}s "
                    f"after its revocation returned (bound {BOUND:.1f}s; watcher at sequence "
                    f"{watcher.validator.sequence}, staleness "
                    f"{watcher.validator.staleness:.1f}s)"
                )

    # --- the end ------------------------------------------------------------------------

    async def _compare_with_database(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            head = await conn.fetchval("SELECT sequence FROM revocation_log_head")
            deadline = time.monotonic() + CATCH_UP_WITHIN
            while time.monotonic() < deadline and not all(
                w.validator.fresh and w.validator.sequence == head for w in self.watchers
            ):
                await asyncio.sleep(0.1)
                head = await conn.fetchval("SELECT sequence FROM revocation_log_head")
            # Every watcher at the log's head: every revocation ever made must be refused.
            for revoked in self._followed:
                self._ask_watchers(revoked, time.monotonic())
            now = time.time()
            log_sessions, log_users = await _log_sets(conn, now)
            table_problems = await _tables_agree_with_log(conn, now, log_sessions, log_users)
        finally:
            await conn.close()
        log = self.log
        log.database_final = {
            "head": head,
            "revoked_sessions": len(log_sessions),
            "revoked_users": len(log_users),
        }
        log.final_differences += table_problems
        for watcher in self.watchers:
            validator = watcher.validator
            sessions, users = watcher.held()
            sessions = {s: k for s, k in sessions.items() if k > now}
            users = {u: v for u, v in users.items() if v[1] > now}
            log.watchers_final.append(
                {
                    "name": watcher.name,
                    "sequence": validator.sequence,
                    "fresh": validator.fresh,
                    "revoked_sessions": len(sessions),
                    "revoked_users": len(users),
                    "reconnects": validator.reconnects,
                    "snapshots_applied": validator.snapshots_applied,
                    "validators": watcher.generations,
                }
            )
            if not validator.fresh:
                log.final_differences.append(f"watcher {watcher.name}: not fresh at the end")
            if validator.sequence != head:
                log.final_differences.append(
                    f"watcher {watcher.name}: at sequence {validator.sequence}, the log at {head}"
                )
            log.final_differences += [
                f"watcher {watcher.name}: {d}"
                for d in _differences("sessions", sessions, log_sessions)
                + _differences("users", users, log_users)
            ]
        self._event(
            f"watchers compared with the database (head {head}, {len(log_sessions)} sessions, "
            f"{len(log_users)} users): {len(log.final_differences)} differences"
        )


async def _log_sets(
    conn: asyncpg.Connection, now: float
) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
    """The revoked sessions and users the log says to remember at `now` (as a watcher holds
    them: the latest generation and keep_until per user)."""
    rows = await conn.fetch(
        """SELECT kind, session_id::text AS session_id, user_id::text AS user_id, generation,
                  extract(epoch FROM keep_until)::float8 AS keep_until
             FROM revocation_log
            WHERE kind IN ('session', 'user') AND sequence IS NOT NULL
              AND keep_until > to_timestamp($1)""",
        now,
    )
    sessions: dict[str, float] = {}
    users: dict[str, tuple[int, float]] = {}
    for r in rows:
        if r["kind"] == "session":
            sessions[r["session_id"]] = max(sessions.get(r["session_id"], 0.0), r["keep_until"])
        else:
            generation, until = users.get(r["user_id"], (0, 0.0))
            users[r["user_id"]] = (max(generation, r["generation"]), max(until, r["keep_until"]))
    return sessions, users


async def _tables_agree_with_log(
    conn: asyncpg.Connection,
    now: float,
    log_sessions: dict[str, float],
    log_users: dict[str, tuple[int, float]],
) -> list[str]:
    """The log against the tables it records: revoked sessions (each one the log names, or
    one its user's revocation covers) and users' revoked generations."""
    keep = "interval '360 seconds'"  # REMEMBER_PAST_BOUND_SECONDS, as migration 0011
    session_rows = await conn.fetch(
        f"""SELECT s.id::text AS id, s.user_id::text AS user_id, s.user_generation,
                   extract(epoch FROM s.access_expires_max + {keep})::float8 AS keep_until
              FROM sessions s
             WHERE s.revoked_at IS NOT NULL
               AND s.access_expires_max + {keep} > to_timestamp($1)""",  # noqa: S608
        now,
    )
    user_rows = await conn.fetch(
        f"""SELECT id::text AS id, session_generation,
                   extract(epoch FROM revoked_sessions_until + {keep})::float8 AS keep_until
              FROM users
             WHERE sessions_revoked_at IS NOT NULL
               AND revoked_sessions_until + {keep} > to_timestamp($1)""",  # noqa: S608
        now,
    )
    problems: list[str] = []
    table_users = {r["id"]: r["session_generation"] for r in user_rows}
    log_generations = {u: g for u, (g, _) in log_users.items()}
    if table_users != log_generations:
        problems.append(
            "database: users table and log disagree on revoked generations: "
            f"{_examples(table_users.items() ^ log_generations.items())}"
        )
    revoked = {r["id"]: r for r in session_rows}
    not_in_table = [s for s in log_sessions if s not in revoked]
    if not_in_table:
        problems.append(
            f"database: {len(not_in_table)} sessions in the log are not revoked in the "
            f"sessions table: {_examples(not_in_table)}"
        )
    wrong_until = [
        s
        for s, until in log_sessions.items()
        if s in revoked and abs(revoked[s]["keep_until"] - until) > 0.001
    ]
    if wrong_until:
        problems.append(
            f"database: {len(wrong_until)} sessions' keep_until differ between log and "
            f"table: {_examples(wrong_until)}"
        )
    uncovered = [
        s
        for s, r in revoked.items()
        if s not in log_sessions
        and not (r["user_id"] in log_users and r["user_generation"] < log_users[r["user_id"]][0])
    ]
    if uncovered:
        problems.append(
            f"database: {len(uncovered)} revoked sessions are neither in the log nor covered "
            f"by their user's revocation: {_examples(uncovered)}"
        )
    return problems


def _differences(what: str, held: dict[str, Any], truth: dict[str, Any]) -> list[str]:
    """How a watcher's set differs from the database's: missing, extra, different values."""
    missing = [k for k in truth if k not in held]
    extra = [k for k in held if k not in truth]
    differ = [k for k in truth if k in held and not _same(held[k], truth[k])]
    out = []
    if missing:
        out.append(f"{len(missing)} revoked {what} missing: {_examples(missing)}")
    if extra:
        out.append(f"{len(extra)} {what} held that the log does not revoke: {_examples(extra)}")
    if differ:
        out.append(
            f"{len(differ)} {what} held with another generation or keep_until: "
            f"{_examples(f'{k} {held[k]} != {truth[k]}' for k in differ)}"
        )
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, timestamps to the millisecond (the log's microseconds, carried as floats)."""
    if isinstance(a, tuple):
        return bool(a[0] == b[0]) and abs(float(a[1]) - float(b[1])) <= 0.001
    return abs(float(a) - float(b)) <= 0.001


def _examples(items: Any) -> str:
    shown = [str(i) for i in list(items)[:_PROBLEMS_SHOWN]]
    return ", ".join(shown) + (" ..." if len(shown) == _PROBLEMS_SHOWN else "")


__all__ = ["BOUND", "Outages", "WatchLog", "WatchProcess", "WatchSoak"]


class WatchProcess:
    """`WatchSoak` in a spawned process of its own, fed the soak's PostgreSQL outages and
    reuse attacks. A process, not a thread: with grpc.aio running in the soak's process,
    the children it forks (pg_ctl, run as another user) died with SIGSEGV before exec."""

    def __init__(self, *, t0: float, **options: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._inbox: multiprocessing.Queue[tuple[Any, ...]] = context.Queue()
        self._outbox: multiprocessing.Queue[tuple[Any, ...]] = context.Queue()
        self._process = context.Process(
            target=_watch_process_main,
            args=(options, t0, self._inbox, self._outbox),
            name="soak-watchers",
            daemon=True,
        )
        self._log: WatchLog | None = None
        self._start_problem: str | None = None

    def start(self, within: float = 90.0) -> None:
        self._process.start()
        try:
            message = self._outbox.get(timeout=within)
        except queue.Empty:
            self._start_problem = f"the watch process did not start within {within:.0f}s"
            return
        if message[0] == "done":
            self._log = message[1]

    def outage(self, *, begun: bool) -> None:
        self._inbox.put(("outage", begun, time.monotonic()))

    def attack(self, attack: Attack) -> None:
        self._inbox.put(("attack", attack))

    def finish(self, within: float = 120.0) -> WatchLog:
        """Stop the chaos and the revoker, settle, compare; the log of it all."""
        if self._log is not None:
            return self._log
        self._inbox.put(("stop",))
        log = WatchLog()
        deadline = time.monotonic() + within
        while self._log is None:
            try:
                message = self._outbox.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                log.problems.append("the watch process did not finish in time")
                self._log = log
                break
            if message[0] == "done":
                self._log = message[1]
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
        if self._start_problem is not None:
            self._log.problems.append(self._start_problem)
        return self._log


def _watch_process_main(
    options: dict[str, Any],
    t0: float,
    inbox: multiprocessing.Queue[tuple[Any, ...]],
    outbox: multiprocessing.Queue[tuple[Any, ...]],
) -> None:
    def event(text: str) -> None:
        line = f"[soak {time.monotonic() - t0:6.1f}s] {text}"
        watch.log.events.append(line)
        print(line, file=sys.stderr, flush=True)

    attacks = AttackLog()
    outages = Outages()
    watch = WatchSoak(attacks=attacks, outages=outages, event=event, **options)
    stop = threading.Event()

    def drain() -> None:
        while True:
            message = inbox.get()
            if message[0] == "stop":
                stop.set()
                return
            if message[0] == "outage":
                (outages.begin if message[1] else outages.end)(message[2])
            elif message[0] == "attack":
                attacks.attacks.append(message[1])

    threading.Thread(target=drain, name="soak-watch-inbox", daemon=True).start()
    watch.start()
    outbox.put(("ready",))
    stop.wait()
    outbox.put(("done", watch.finish()))
