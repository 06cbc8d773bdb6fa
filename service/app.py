"""Wiring: build the service from its parts, start the gRPC server, stop it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service.api.admin_servicer import AdminServicer, add_admin_servicer
from service.api.auth_servicer import AuthServicer, add_auth_servicer
from service.api.callers import CallerAuthInterceptor, ServiceDirectory
from service.api.streams import (
    CallBudgetInterceptor,
    StreamBudget,
    UnaryBudget,
    transport_options,
)
from service.clock import Clock, SystemClock
from service.database import connect, create_pool, resolve_database_url, unreachable
from service.domain.access_tokens import AccessTokenCodec
from service.domain.events import peer_address
from service.domain.janitor import Janitor
from service.domain.keys import KeyRing
from service.domain.passwords import PasswordHasher
from service.domain.revocation import RevocationState, VerifiedTokenCache
from service.domain.signing_keys import SigningKeys
from service.domain.telemetry import NoTelemetry, Telemetry
from service.domain.throttle import LoginThrottle
from service.domain.tokens import (
    CallerInfo,
    TokenService,
    load_refresh_secret,
    open_refresh_secret,
)
from service.domain.users import UserDirectory
from service.errors import AuthError
from service.failures import ConfigurationError, DatabaseUnreachable, KekMissing
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
from service.store import UNAVAILABLE_ERRORS, PostgresStore, apply_migrations
from service.store.migrations import MigrationLockTimeout, check_schema
from service.store.revocation_feed import RevocationFeed

log = logging.getLogger(__name__)

READY_FD_VARIABLE = "AUTHSVC_WORKER_READY_FD"

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
"""Each asks `authsvc serve` (one process, or the supervisor) for the graceful stop;
SIGQUIT too, so it leaves no embedded PostgreSQL or metrics files behind."""
AUTH_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# A health "service" that says whether revocations are heard live (see README).
REVOCATIONS_HEALTH_NAME = "authsvc.revocations"
# Refused admin calls waiting to be written: distinct (actor, method, reason, address)
# keys, and the least time between two writes of the counts.
_REFUSAL_KEYS_PENDING = 100
_REFUSAL_WRITE_INTERVAL = 1.0


def key_encryption_key(settings: Settings) -> bytes:
    """AUTH_KEK; with the embedded database only, the KEK file in AUTH_DATA_DIR (created
    with mode 0600 on first use: `make run` needs no configuration).

    With AUTH_DATABASE_URL the KEK must be given: a key invented here, in whatever
    directory a command happens to run, would seal key material no other replica opens.
    Only `serve` and `keys rotate` call this (other commands need no key material).
    """
    if settings.kek is not None:
        return settings.kek
    if settings.database_url is not None:
        raise KekMissing()
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

    def close(self) -> None:
        self.hasher.close()


def _signing_keys(
    settings: Settings,
    store: PostgresStore,
    box: SecretBox | None,
    clock: Clock,
    telemetry: Telemetry,
) -> SigningKeys:
    return SigningKeys(
        store=store,
        box=box,
        clock=clock,
        alg=settings.signing_alg,
        access_ttl=settings.access_ttl,
        leeway=settings.leeway,
        telemetry=telemetry,
    )


async def load_key_material(
    store: PostgresStore, signing_keys: SigningKeys, box: SecretBox, clock: Clock
) -> tuple[KeyRing, bytes]:
    """The signing keys and the refresh secret, creating them on first start.

    Everything stored is opened before anything is created, so a wrong KEK stops us
    (KeyDecryptionError) before it seals a new key beside ones it cannot open.
    """
    await open_refresh_secret(store, box)
    key_ring = await signing_keys.load()
    refresh_secret = await load_refresh_secret(store, box, clock=clock)
    return key_ring, refresh_secret


async def prepare_key_material(settings: Settings, pool: asyncpg.Pool) -> None:
    """What `serve --workers N` checks (and creates on first start) before it starts any
    worker: a missing or wrong KEK is then one line from the supervisor."""
    store = PostgresStore(pool, timeout=settings.db_timeout)
    clock = SystemClock()
    box = SecretBox(key_encryption_key(settings))
    keys = _signing_keys(settings, store, box, clock, NoTelemetry())
    await load_key_material(store, keys, box, clock)


async def build_components(
    settings: Settings,
    *,
    pool: asyncpg.Pool,
    clock: Clock,
    telemetry: Telemetry | None = None,
    key_material: bool = True,
) -> Components:
    """Everything but the revocation feed (the CLI needs no feed).

    Without `key_material` (operators' commands that do not sign, verify or create keys)
    no KEK is needed and nothing is opened or created: `tokens` then only revokes.
    """
    telemetry = telemetry or NoTelemetry()
    store = PostgresStore(
        pool, timeout=settings.db_timeout, event_window=settings.event_aggregation_window
    )
    revocations = RevocationState()
    token_cache = VerifiedTokenCache(settings.token_cache_size)
    box = SecretBox(key_encryption_key(settings)) if key_material else None
    signing_keys = _signing_keys(settings, store, box, clock, telemetry)
    codec = None
    refresh_secret = None
    if box is not None:
        key_ring, refresh_secret = await load_key_material(store, signing_keys, box, clock)
        codec = AccessTokenCodec(
            issuer=settings.issuer, key_ring=key_ring, clock=clock, leeway=settings.leeway
        )
    # As many hashing threads as cores in every worker: at the lowest priority
    # they take only idle CPU, so one busy worker may use all of it.
    hasher = PasswordHasher(threads=os.cpu_count() or 1)
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
        janitor=Janitor(
            settings=settings, store=store, keys=signing_keys, clock=clock, telemetry=telemetry
        ),
    )


@asynccontextmanager
async def open_components(
    settings: Settings, *, key_material: bool = False
) -> AsyncIterator[Components]:
    """The components over the configured database, for one-shot commands such as
    `authsvc users` and the load tool's seeding; closed on exit.

    The schema must be this binary's (they migrate nothing: `SchemaMismatch` otherwise).
    Key material is opened (and created on first use) only if asked for.
    """
    dsn = await resolve_database_url(settings)
    pool = await create_pool(dsn, settings)
    try:
        async with pool.acquire() as conn:
            await check_schema(conn)
        components = await build_components(
            settings, pool=pool, clock=SystemClock(), key_material=key_material
        )
        try:
            yield components
        finally:
            components.close()
    finally:
        await pool.close()


async def migrate(dsn: str, settings: Settings) -> list[str]:
    """Apply pending migrations on a connection of their own, under AUTH_MIGRATION_TIMEOUT
    (not the per-call AUTH_DB_TIMEOUT): waiting for another replica's migration, or one
    statement on a large table, may take minutes."""
    limit = settings.migration_timeout or None
    # The client-side limit a little after the server's, so its clean error comes first.
    conn = await connect(dsn, settings, command_timeout=None if limit is None else limit + 5)
    try:
        return await apply_migrations(conn, lock_timeout=limit, statement_timeout=limit)
    except MigrationLockTimeout as exc:
        raise DatabaseUnreachable(
            f"gave up waiting for the migration lock after {exc.waited:.0f}s (held by pid "
            f"{exc.holder}): raise AUTH_MIGRATION_TIMEOUT or end that session"
        ) from None
    except (asyncpg.QueryCanceledError, TimeoutError):
        raise DatabaseUnreachable(
            "a migration did not finish within AUTH_MIGRATION_TIMEOUT="
            f"{settings.migration_timeout:g}s (or was cancelled): raise it (0: no limit) and "
            "run `authsvc migrate` again"
        ) from None
    except UNAVAILABLE_ERRORS as exc:
        raise unreachable(exc, dsn, settings) from None
    finally:
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await conn.close()


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
        await self.components.tokens.finish_password_checks()
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
    if not reuse_port:
        check_can_listen(listen or settings.listen)
    credentials = server_credentials(settings)
    directory = service_directory(settings) if settings.caller_auth else None
    telemetry = PrometheusTelemetry() if settings.metrics_listen is not None else None
    async with contextlib.AsyncExitStack() as undo:
        endpoint = None
        # A --workers child writes shared files; its supervisor serves them.
        if telemetry is not None and not multiprocess_enabled():
            assert settings.metrics_listen is not None
            endpoint = start_metrics_endpoint(settings.metrics_listen, telemetry.registry)
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
    if telemetry is not None:
        background.append(
            asyncio.create_task(
                sample_forever(telemetry, _sampler(components, feed, pool)), name="metrics"
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
                log_window=settings.event_aggregation_window,
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
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # newer gRPC raises where older returned port 0
        port = 0
    if port == 0:
        raise ConfigurationError(
            f"AUTH_LISTEN: cannot listen on {address} (in use by another process, not an "
            "address of this host, or TLS files gRPC cannot load)"
        )
    await server.start()
    for service_name in ("", AUTH_SERVICE_NAME, ADMIN_SERVICE_NAME):
        await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def start_metrics_endpoint(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """The /metrics endpoint on `listen`, or one line saying it cannot listen there."""
    try:
        return MetricsEndpoint.start(listen, registry)
    except OSError as exc:
        raise ConfigurationError(
            f"AUTH_METRICS_LISTEN: cannot listen on {listen} ({exc.strerror or exc})"
        ) from None


def check_can_listen(address: str) -> None:
    """Refuse an address we cannot bind (in use, not ours) with one line, before gRPC logs
    its own error lines and before any database work. SO_REUSEADDR as gRPC sets it, so a
    port left in TIME_WAIT by a server just stopped is not refused."""
    host, _, port_text = address.rpartition(":")
    if port_text == "0":
        return
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host.strip("[]") or None,
            int(port_text),
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        raise ConfigurationError(
            f"AUTH_LISTEN: cannot listen on {address} ({exc.strerror or exc})"
        ) from None


def _refusal_recorder(
    users: UserDirectory,
) -> Callable[[str, str, str | None, str | None], Awaitable[None]]:
    """Records admin calls refused for their credentials as security events, in the
    background (the refusal is not held up by a slow database). A refused call costs its
    sender next to nothing, so refusals are counted in memory per actor, method, reason
    and address, and each count is added to its aggregated row at most once a second: a
    flood becomes neither as many rows nor as many writes. At most
    `_REFUSAL_KEYS_PENDING` such keys wait at once; refusals beyond them are only logged."""
    # (method, reason, actor, address) -> [the first peer, refusals not yet written]
    pending: dict[tuple[str, str, str, str], list[Any]] = {}
    writer: list[asyncio.Task[None]] = []

    async def write_pending() -> None:
        while pending:
            batch = list(pending.items())
            pending.clear()
            for (method, reason, actor, _), (peer, count) in batch:
                with contextlib.suppress(AuthError):
                    await users.record_refusal(
                        method=method,
                        reason=reason,
                        caller=CallerInfo(peer=peer, actor=actor),
                        occurrences=count,
                    )
            if pending:  # more came in meanwhile: counted on, written a second later
                await asyncio.sleep(_REFUSAL_WRITE_INTERVAL)

    async def record(method: str, reason: str, peer: str | None, service: str | None) -> None:
        actor = f"admin:{service or 'unauthenticated'}"
        key = (method.rpartition("/")[2], reason, actor, peer_address(peer))
        waiting = pending.get(key)
        if waiting is not None:
            waiting[1] += 1
        elif len(pending) < _REFUSAL_KEYS_PENDING:
            pending[key] = [peer, 1]
        if not writer or writer[0].done():
            # Referenced until done, so the task is not collected mid-way.
            writer[:] = [asyncio.get_running_loop().create_task(write_pending())]

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
    components: Components, feed: RevocationFeed, pool: asyncpg.Pool
) -> Callable[[], ProcessSample]:
    def take_sample() -> ProcessSample:
        idle = pool.get_idle_size()
        return ProcessSample(
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
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read_file("AUTH_TLS_CLIENT_CA", settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [
            (
                _read_file("AUTH_TLS_KEY", settings.tls_key),
                _read_file("AUTH_TLS_CERT", settings.tls_cert),
            )
        ],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read_file(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot read {path} ({exc.strerror})") from None


def service_directory(settings: Settings) -> ServiceDirectory:
    """The known calling services (none without AUTH_SERVICE_TOKENS_FILE)."""
    if settings.service_tokens_file is None:
        return ServiceDirectory([])
    return ServiceDirectory.from_file(settings.service_tokens_file)


async def serve(settings: Settings, *, worker: bool = False) -> None:
    """`authsvc serve` in one process: migrate, start, and run until SIGTERM, SIGINT or
    SIGQUIT (SIGHUP is ignored by the command, see `service.cli`).

    As a `--workers` child (`worker=True`) it binds with SO_REUSEPORT beside its
    siblings and tells the supervisor through a pipe when it is ready.
    """
    # From here on a signal asks for a graceful stop (even one that arrives while starting).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    key_encryption_key(settings)  # a missing AUTH_KEK stops us before the database is touched
    dsn = await resolve_database_url(settings)
    if not worker:
        for name in await migrate(dsn, settings):
            log.info("applied migration %s", name)
    pool = await create_pool(dsn, settings)
    try:
        if worker:  # the supervisor migrated; a worker restarted later only checks
            async with pool.acquire() as conn:
                await check_schema(conn)
        running = await start_server(
            settings, dsn=dsn, pool=pool, clock=SystemClock(), reuse_port=worker
        )
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
