"""Wiring: build the service from its parts, start the gRPC server, stop it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.admin_servicer import AdminServicer, add_admin_servicer
from service.api.auth_servicer import AuthServicer, add_auth_servicer
from service.api.callers import CallerAuthInterceptor, ServiceDirectory
from service.api.streams import (
    CallBudgetInterceptor,
    StreamBudget,
    UnaryBudget,
    transport_options,
)
from service.clock import (
    Clock,
    ClockReading,
    ClockSkewTooLarge,
    DatabaseClock,
    describe_skew,
    judge_skew,
    keep_measuring,
)
from service.database import create_pool, resolve_database_url
from service.domain.access_tokens import AccessTokenCodec
from service.domain.janitor import Janitor
from service.domain.passwords import PasswordHasher
from service.domain.revocation import RevocationState, VerifiedTokenCache
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import NoTelemetry, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.tokens import CallerInfo, TokenService, load_refresh_secret
from service.domain.users import UserDirectory
from service.errors import AuthError
from service.gen.auth.v1 import admin_pb2, auth_pb2
from service.metrics import (
    MetricsEndpoint,
    MetricsInterceptor,
    ProcessSample,
    PrometheusTelemetry,
    multiprocess_enabled,
    sample_forever,
)
from service.secrets_box import SecretBox, load_or_create_kek_file
from service.settings import Settings
from service.store import PostgresStore, apply_migrations
from service.store.revocation_feed import RevocationFeed

log = logging.getLogger(__name__)

READY_FD_VARIABLE = "AUTHSVC_WORKER_READY_FD"
AUTH_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# A health "service" that says whether revocations are heard live (see README).
REVOCATIONS_HEALTH_NAME = "authsvc.revocations"
_REFUSALS_RECORDED_PER_SECOND = 20
# Readings of the database's clock per measurement; the shortest round trip counts.
_CLOCK_READINGS = 5


def key_encryption_key(settings: Settings) -> bytes:
    """AUTH_KEK, or the KEK file in AUTH_DATA_DIR (created with mode 0600 on first use)."""
    if settings.kek is not None:
        return settings.kek
    return load_or_create_kek_file(settings.data_dir / "kek")


@dataclass(frozen=True)
class Components:
    """The domain objects of one process, built from settings, a pool and a clock."""

    store: PostgresStore
    tokens: TokenService
    users: UserDirectory
    hasher: PasswordHasher
    revocations: RevocationState
    token_cache: VerifiedTokenCache
    signing_keys: SigningKeys
    janitor: Janitor
    clock: Clock

    def close(self) -> None:
        self.hasher.close()


async def build_components(
    settings: Settings,
    *,
    pool: asyncpg.Pool,
    clock: Clock,
    telemetry: Telemetry | None = None,
) -> Components:
    """Everything but the revocation feed (the CLI needs no feed)."""
    telemetry = telemetry or NoTelemetry()
    store = PostgresStore(pool, timeout=settings.db_timeout)
    revocations = RevocationState(access_ttl=settings.access_ttl, leeway=settings.leeway)
    token_cache = VerifiedTokenCache(settings.token_cache_size)
    box = SecretBox(key_encryption_key(settings))
    signing_keys = SigningKeys(
        store=store,
        box=box,
        clock=clock,
        alg=settings.signing_alg,
        access_ttl=settings.access_ttl,
        leeway=settings.leeway,
        telemetry=telemetry,
    )
    key_ring = await signing_keys.load()
    refresh_secret = await load_refresh_secret(store, box, clock=clock)
    # As many hashing threads as cores in every worker: at the lowest priority
    # they take only idle CPU, so one busy worker may use all of it.
    hasher = PasswordHasher(threads=os.cpu_count() or 1)
    codec = AccessTokenCodec(
        issuer=settings.issuer, key_ring=key_ring, clock=clock, leeway=settings.leeway
    )
    tokens = TokenService(
        settings=settings,
        store=store,
        codec=codec,
        hasher=hasher,
        refresh_secret=refresh_secret,
        revocations=revocations,
        cache=token_cache,
        clock=clock,
        throttle=(
            LoginThrottle.from_settings(settings, store=store, clock=clock)
            if settings.login_throttle
            else None
        ),
        telemetry=telemetry,
        signing_keys=signing_keys,
    )
    users = UserDirectory(store=store, hasher=hasher, tokens=tokens, clock=clock)
    return Components(
        store=store,
        tokens=tokens,
        users=users,
        hasher=hasher,
        revocations=revocations,
        token_cache=token_cache,
        signing_keys=signing_keys,
        janitor=Janitor(settings=settings, store=store, keys=signing_keys, clock=clock),
        clock=clock,
    )


@asynccontextmanager
async def open_components(settings: Settings) -> AsyncIterator[Components]:
    """The components over the configured database (migrated), for one-shot commands
    such as `authsvc users` and the load tool's seeding; closed on exit."""
    dsn = await resolve_database_url(settings)
    pool = await create_pool(dsn, settings)
    try:
        await migrate(pool)
        # The database's time, as the servers use: an admin command's key schedule or
        # event window must not depend on this host's clock (too far off: a warning).
        clock = await start_database_clock(settings, pool, refuse=False)
        components = await build_components(settings, pool=pool, clock=clock)
        try:
            yield components
        finally:
            components.close()
    finally:
        await pool.close()


async def start_database_clock(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    refuse: bool = True,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> DatabaseClock:
    """The database's clock, measured once; raises ClockSkewTooLarge (with `refuse`) when
    this host's wall clock is past AUTH_CLOCK_SKEW_MAX from it, and warns past
    AUTH_CLOCK_SKEW_WARN. `wall` and `monotonic` are this host's clocks (tests skew them)."""
    store = PostgresStore(pool, timeout=settings.db_timeout)

    async def take_readings() -> list[ClockReading]:
        return await store.clock_readings(_CLOCK_READINGS, monotonic=monotonic, wall=wall)

    clock = DatabaseClock(take_readings, monotonic=monotonic)
    offset = await clock.measure()
    verdict = judge_skew(
        offset.wall_skew, warn=settings.clock_skew_warn, limit=settings.clock_skew_max
    )
    if verdict == "refuse" and refuse:
        raise ClockSkewTooLarge(offset.wall_skew, settings.clock_skew_max)
    if verdict != "ok":
        log.warning(
            "this host's clock is %s the database's (AUTH_CLOCK_SKEW_WARN=%gs); "
            "the service uses the database's time",
            describe_skew(offset.wall_skew),
            settings.clock_skew_warn,
        )
    return clock


async def migrate(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        return await apply_migrations(conn)


@dataclass
class RunningServer:
    """A started gRPC server and the port it listens on."""

    server: grpc.aio.Server
    port: int
    components: Components
    revocation_feed: RevocationFeed
    health: health_async.HealthServicer
    background: list[asyncio.Task[None]]
    """The janitor and, with metrics on, the sampler."""
    stream_budget: StreamBudget
    telemetry: PrometheusTelemetry | None = None
    metrics_endpoint: MetricsEndpoint | None = None

    async def stop(self, grace: float | None) -> None:
        # Probes see NOT_SERVING first, so load balancers drain us while calls finish.
        await self.health.enter_graceful_shutdown()
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        await self.revocation_feed.stop()
        self.components.close()


async def start_server(
    settings: Settings,
    *,
    dsn: str,
    pool: asyncpg.Pool,
    clock: Clock,
    listen: str | None = None,
    reuse_port: bool = False,
) -> RunningServer:
    """Build the components, load revocations, and serve on `listen` (default settings.listen).

    `dsn` is for the revocation listener's own connection, outside the pool. If any step
    fails, what the earlier ones started is stopped again before the error propagates.
    """
    # Configuration first: a bad file or setting must stop us before anything runs.
    credentials = server_credentials(settings)
    directory = service_directory(settings) if settings.caller_auth else None
    telemetry = PrometheusTelemetry() if settings.metrics_listen is not None else None
    async with contextlib.AsyncExitStack() as undo:
        endpoint = None
        # A --workers child writes shared files; its supervisor serves them.
        if telemetry is not None and not multiprocess_enabled():
            assert settings.metrics_listen is not None
            endpoint = MetricsEndpoint.start(settings.metrics_listen, telemetry.registry)
            undo.callback(endpoint.close)
        components = await build_components(settings, pool=pool, clock=clock, telemetry=telemetry)
        undo.callback(components.close)
        health = health_async.HealthServicer()

        async def revocations_followed(listening: bool) -> None:
            # NOT_SERVING while this process is not hearing revocations live: Validate
            # still answers, from state that may lag until the listener is back.
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if listening
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            await health.set(REVOCATIONS_HEALTH_NAME, status)

        feed = RevocationFeed(
            dsn=dsn,
            pool=pool,
            state=components.revocations,
            clock=clock,
            poll_interval=settings.revocation_poll_interval,
            timeout=settings.db_timeout,
            on_listening=revocations_followed,
            on_keys_changed=components.signing_keys.reload,
        )
        await feed.start()
        undo.push_async_callback(feed.stop)
        stream_budget = StreamBudget(
            limit=settings.max_streams,
            per_peer=settings.max_streams_per_peer,
            max_age=settings.stream_max_age,
        )
        server, port = await _serve_grpc(
            settings,
            components,
            health,
            telemetry,
            directory,
            stream_budget,
            credentials,
            listen,
            reuse_port,
        )
        undo.pop_all()  # started: from here on RunningServer.stop undoes it all
    _log_start_up(settings, port, components, clock)
    background = [asyncio.create_task(components.janitor.run_forever(), name="janitor")]
    if isinstance(clock, DatabaseClock):

        async def serving(ok: bool) -> None:
            # Not ready while this host's clock is too far off (see README, Clocks).
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service_name in ("", AUTH_SERVICE_NAME, ADMIN_SERVICE_NAME):
                await health.set(service_name, status)

        background.append(
            asyncio.create_task(
                keep_measuring(
                    clock,
                    interval=settings.clock_check_interval,
                    warn=settings.clock_skew_warn,
                    limit=settings.clock_skew_max,
                    on_serving=serving,
                ),
                name="database-clock",
            )
        )
    if telemetry is not None:
        background.append(
            asyncio.create_task(
                sample_forever(telemetry, _sampler(components, feed, pool, clock)),
                name="metrics",
            )
        )
    return RunningServer(
        server=server,
        port=port,
        components=components,
        revocation_feed=feed,
        health=health,
        background=background,
        stream_budget=stream_budget,
        telemetry=telemetry,
        metrics_endpoint=endpoint,
    )


async def _serve_grpc(
    settings: Settings,
    components: Components,
    health: health_async.HealthServicer,
    telemetry: PrometheusTelemetry | None,
    directory: ServiceDirectory | None,
    stream_budget: StreamBudget,
    credentials: grpc.ServerCredentials | None,
    listen: str | None,
    reuse_port: bool,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with every service and interceptor, bound and started."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if telemetry is not None:
        # First, so refused calls are counted too.
        interceptors.append(MetricsInterceptor(telemetry))
    # Before the caller check, so calls that fail it are held to the budgets too.
    interceptors.append(
        CallBudgetInterceptor(UnaryBudget(settings.max_concurrent_rpcs), stream_budget)
    )
    if directory is not None:
        interceptors.append(
            CallerAuthInterceptor(
                directory=directory,
                guarded=settings.caller_auth,
                on_admin_refused=_refusal_recorder(components.users),
            )
        )
    server = grpc.aio.server(
        interceptors=interceptors,
        # No maximum_concurrent_rpcs: it counts streams and unary calls alike, so idle
        # streams could use it up. CallBudgetInterceptor refuses calls beyond their own
        # budget at once (RESOURCE_EXHAUSTED) instead of queueing them without bound.
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Off unless we are one of several workers: a second server started
            # by mistake must fail to bind, not silently share the port.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *transport_options(settings),
        ],
    )
    add_auth_servicer(AuthServicer(components.tokens), server)
    add_admin_servicer(AdminServicer(users=components.users, keys=components.signing_keys), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            AUTH_SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = listen or settings.listen
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    for service_name in ("", AUTH_SERVICE_NAME, ADMIN_SERVICE_NAME):
        await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _refusal_recorder(
    users: UserDirectory,
) -> Callable[[str, str, str | None, str | None], Awaitable[None]]:
    """Records admin calls refused for their credentials as security events, in the
    background (the refusal is not held up by a slow database), at most
    `_REFUSALS_RECORDED_PER_SECOND` a second per process: an unauthenticated flood must not
    become as many database writes (the log line is written for every one)."""
    window = [0.0, 0]  # start of the current second, events recorded in it
    writing: set[asyncio.Task[None]] = set()

    async def write(method: str, reason: str, peer: str | None, service: str | None) -> None:
        with contextlib.suppress(AuthError):
            await users.audit(
                "admin_call_refused",
                caller=CallerInfo(peer=peer, actor=f"admin:{service or 'unauthenticated'}"),
                method=method.rpartition("/")[2],
                reason=reason,
            )

    async def record(method: str, reason: str, peer: str | None, service: str | None) -> None:
        now = time.monotonic()
        if now - window[0] >= 1.0:
            window[0], window[1] = now, 0
        if (
            window[1] >= _REFUSALS_RECORDED_PER_SECOND
            or len(writing) >= _REFUSALS_RECORDED_PER_SECOND
        ):
            return
        window[1] += 1
        task = asyncio.get_running_loop().create_task(write(method, reason, peer, service))
        writing.add(task)  # a reference until done, so the task is not collected mid-way
        task.add_done_callback(writing.discard)

    return record


def _log_start_up(settings: Settings, port: int, components: Components, clock: Clock) -> None:
    """One line an operator can check the deployment against (no secrets in it)."""
    signing = components.signing_keys.ring.signing_key(clock.now())
    log.info(
        "serving auth.v1 on port %d: tls=%s client-certificates=%s caller-auth=%s metrics=%s "
        "signing-key=%s/%s access-ttl=%ds refresh-idle=%ds refresh-absolute=%ds "
        "reuse-grace=%ds login-throttle=%s key-rotation=%s",
        port,
        "on" if settings.tls_cert else "off",
        "required" if settings.tls_client_ca else "off",
        ",".join(sorted(settings.caller_auth)) or "off",
        settings.metrics_listen or "off",
        signing.kid,
        signing.alg,
        settings.access_ttl,
        settings.refresh_idle_ttl,
        settings.refresh_absolute_ttl,
        settings.refresh_reuse_grace,
        "on" if settings.login_throttle else "off",
        f"every {settings.key_rotation_period}s" if settings.key_rotation_period else "manual",
    )


def _sampler(
    components: Components, feed: RevocationFeed, pool: asyncpg.Pool, clock: Clock
) -> Callable[[], ProcessSample]:
    database_clock = clock if isinstance(clock, DatabaseClock) else None

    def take_sample() -> ProcessSample:
        idle = pool.get_idle_size()
        return ProcessSample(
            clock_skew_seconds=None if database_clock is None else database_clock.wall_skew,
            clock_measured_seconds_ago=(
                None if database_clock is None else database_clock.seconds_since_measured()
            ),
            cache_hits=components.token_cache.hits,
            cache_misses=components.token_cache.misses,
            revoked_sessions=len(components.revocations),
            revocation_lag_seconds=components.revocations.lag,
            revocation_listener_up=feed.listening.is_set(),
            pool_in_use=pool.get_size() - idle,
            pool_idle=idle,
            pool_max=pool.get_max_size(),
        )

    return take_sample


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from AUTH_TLS_CERT/KEY, requiring client certificates if AUTH_TLS_CLIENT_CA is set;
    None for plaintext."""
    settings.check_transport()
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = None if settings.tls_client_ca is None else settings.tls_client_ca.read_bytes()
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def service_directory(settings: Settings) -> ServiceDirectory:
    """The known calling services (none without AUTH_SERVICE_TOKENS_FILE)."""
    if settings.service_tokens_file is None:
        return ServiceDirectory([])
    return ServiceDirectory.from_file(settings.service_tokens_file)


async def serve(settings: Settings, *, worker: bool = False) -> None:
    """`authsvc serve` in one process: migrate, start, and run until SIGTERM or SIGINT.

    As a `--workers` child (`worker=True`) it binds with SO_REUSEPORT beside its
    siblings and tells the supervisor through a pipe when it is ready.
    """
    # From here on a signal asks for a graceful stop (even one that arrives while starting).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dsn = await resolve_database_url(settings)
    pool = await create_pool(dsn, settings)
    try:
        for name in await migrate(pool):
            log.info("applied migration %s", name)
        # Before serving: refused here (one line) if this host's clock is too far off.
        clock = await start_database_clock(settings, pool)
        running = await start_server(settings, dsn=dsn, pool=pool, clock=clock, reuse_port=worker)
        if worker:
            _tell_supervisor_ready()
        else:
            host = settings.listen.rpartition(":")[0]
            endpoint = running.metrics_endpoint
            print_banner(
                settings,
                f"{host}:{running.port}",
                workers=1,
                metrics=None if endpoint is None else f"{endpoint.host}:{endpoint.port}",
            )
        await stop.wait()
        log.info("stopping: in-flight calls get %.1fs", settings.shutdown_grace)
        await running.stop(settings.shutdown_grace)
    finally:
        # The pool closes after the server, so in-flight calls could finish.
        await pool.close()


def _tell_supervisor_ready() -> None:
    fd = os.environ.get(READY_FD_VARIABLE)
    if fd is not None:
        os.write(int(fd), b"r")
        os.close(int(fd))


def print_banner(
    settings: Settings, address: str, *, workers: int, metrics: str | None = None
) -> None:
    """What `make run` shows: the first-user command, the metrics address, then the address."""
    where = "AUTH_DATABASE_URL"
    if settings.database_url is None:
        where = "embedded PostgreSQL in " + str(settings.data_dir / "postgres")
    print(
        "create a first user (in another terminal, same directory):\n"
        "  .venv/bin/authsvc users create alice --scope read --password-stdin",
        flush=True,
    )
    if metrics is not None:
        print(f"metrics on http://{metrics}/metrics", flush=True)
    print(
        f"authsvc serving on {address} ({workers} worker{'s' if workers != 1 else ''}, "
        f"database: {where})",
        flush=True,
    )
