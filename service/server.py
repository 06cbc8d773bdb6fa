"""The gRPC server of one process: every service and interceptor assembled over the
components, the revocation feed, health (with the `authsvc.revocations`,
`authsvc.settings` and clock-driven statuses docs/operations.md describes), the background
tasks, and the graceful stop that undoes it all (`RunningServer.stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from authsvc_client.gen.auth.v1 import admin_pb2, auth_pb2
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from service.api.admin_refusals import AdminRefusals
from service.api.admin_servicer import AdminServicer, add_admin_servicer
from service.api.auth_servicer import AuthServicer, add_auth_servicer
from service.api.callers import CallerAuthInterceptor, ServiceDirectory
from service.api.revocation_watch import RevocationWatchHub
from service.api.streams import (
    CallBudgetInterceptor,
    StreamBudget,
    UnaryBudget,
    calls_limit,
    transport_options,
)
from service.api.wrapped_handlers import LayeredRegistration
from service.clock import Clock, DatabaseClock, keep_measuring
from service.components import Components, build_components
from service.domain.shared_settings import (
    SharedSettingsWatch,
    agree_on_shared_settings,
    check_shared_settings,
)
from service.failures import ConfigurationError
from service.listening_sockets import listening_tcp_sockets, stop_accepting
from service.metrics import (
    MetricsEndpoint,
    MetricsInterceptor,
    ProcessSample,
    PrometheusTelemetry,
    multiprocess_enabled,
    sample_forever,
)
from service.settings import Settings
from service.startup_checks import (
    check_can_listen,
    server_credentials,
    service_directory,
    start_metrics_endpoint,
)
from service.store import PostgresStore
from service.store.revocation_feed import RevocationFeed

log = logging.getLogger(__name__)

AUTH_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# A health "service" that says whether revocations are heard live (docs/api.md, the health table).
REVOCATIONS_HEALTH_NAME = "authsvc.revocations"
# NOT_SERVING while this replica's settings are not the shared ones any more (someone ran
# `authsvc settings adopt`): it serves on, but should be replaced.
SHARED_SETTINGS_HEALTH_NAME = "authsvc.settings"
# The longest a stopping server refuses new calls before gRPC's stop (RunningServer.stop).
MAX_SHUTDOWN_QUIESCE = 1.0


class HealthServicer(health_async.HealthServicer):  # type: ignore[misc]  # untyped
    """grpc.health.v1.Health with `List` served too: grpcio-health-checking's aio servicer
    leaves it to the generated base (a synchronous UNIMPLEMENTED), which the call budget
    refuses to serve."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


@dataclass
class RunningServer:
    """A started gRPC server and the port it listens on."""

    server: grpc.aio.Server
    port: int
    components: Components
    revocation_feed: RevocationFeed
    watch_hub: RevocationWatchHub
    health: health_async.HealthServicer
    background: list[asyncio.Task[None]]
    """The janitor, the shared-settings watch and, with metrics on, the sampler."""
    stream_budget: StreamBudget
    unary_budget: UnaryBudget
    settings_watch: SharedSettingsWatch
    listening_sockets: frozenset[int]
    """The inodes of the sockets gRPC listens on for us (`service.listening_sockets`)."""
    telemetry: PrometheusTelemetry | None = None
    metrics_endpoint: MetricsEndpoint | None = None

    async def stop(self, grace: float | None, *, drain: float = 0.0) -> None:
        """Report NOT_SERVING, keep serving new calls for `drain` seconds, then stop
        taking calls and give those in flight `grace` seconds.

        Without the drain, calls a client sent before it heard NOT_SERVING (or the
        server's GOAWAY) reach a server that has begun to stop and fail with CANCELLED,
        which no client retries; with it, balancing clients (health `Watch`) move their
        calls to other replicas first.
        """
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            await asyncio.sleep(drain)
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # New connections go to a worker beside us on the port (a replacement, a sibling)
        # or are refused, instead of being taken only to have their calls refused.
        if stop_accepting(self.listening_sockets):
            log.info("stopping: no longer accepting connections")
        # Watchers go on with another replica (they resume from their position), rather
        # than holding the stop for the whole grace.
        self.watch_hub.end_streams()
        # Calls still coming (a client that does not watch health) are refused with
        # UNAVAILABLE until none is in progress or arriving: gRPC's stop ends the calls it
        # has received but not handed to us yet with CANCELLED (grpc/grpc#41785), which
        # no client retries. At most half the grace; the calls in flight have all of it.
        loop = asyncio.get_running_loop()
        give_up = None if grace is None else loop.time() + grace
        await self.unary_budget.close(within=min(MAX_SHUTDOWN_QUIESCE, (grace or 0.0) / 2))
        await self.server.stop(None if give_up is None else max(0.0, give_up - loop.time()))
        if self.unary_budget.refused_while_closed:
            log.info(
                "stopping: %d calls that came after the drain were refused (UNAVAILABLE,"
                " SHUTTING_DOWN)",
                self.unary_budget.refused_while_closed,
            )
        await self.components.logins.finish_password_checks()
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
    agree_settings: bool = True,
) -> RunningServer:
    """Build the components, load revocations, and serve on `listen` (default settings.listen).

    `dsn` is for the revocation listener's own connection, outside the pool. If any step
    fails, what the earlier ones started is stopped again before the error propagates.
    With `agree_settings` the shared settings are compared (`SharedSettingsMismatch`)
    before anything is opened or created, and recorded (first start) once the key material
    is open: a process that cannot start records nothing. A `--workers` child leaves that to
    its supervisor, which did it with the same environment before starting it.
    """
    # Configuration first: a bad file or setting must stop us before anything runs.
    settings.check()  # also settings built in code (from_env already checked its own)
    if not reuse_port:
        check_can_listen(listen or settings.listen)
    credentials = server_credentials(settings)
    directory = service_directory(settings) if settings.caller_auth else None
    if agree_settings:
        await check_shared_settings(PostgresStore(pool, timeout=settings.db_timeout), settings)
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
        if agree_settings:
            await agree_on_shared_settings(components.store, settings, clock=clock)
        health = HealthServicer()

        async def settings_shared(agreeing: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if agreeing
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health.set(SHARED_SETTINGS_HEALTH_NAME, status)

        await settings_shared(True)
        settings_watch = SharedSettingsWatch(components.store, settings, on_change=settings_shared)

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
        watch_hub = RevocationWatchHub(
            state=components.revocations,
            jwks_json=lambda: components.signing_keys.ring.jwks_json,
            max_pending_bytes=settings.watch_queue_bytes,
            heartbeat=settings.watch_heartbeat,
            now=clock.now,
            catch_up=feed.wait_for,
        )
        unary_budget = UnaryBudget(settings.max_concurrent_rpcs)
        stream_budget = StreamBudget(
            limit=settings.max_streams,
            per_peer=settings.max_streams_per_peer,
            max_age=settings.stream_max_age,
        )
        server, port, listening_sockets = await _serve_grpc(
            settings,
            components,
            health,
            telemetry,
            directory,
            unary_budget,
            stream_budget,
            watch_hub,
            credentials,
            listen,
            reuse_port,
        )
        undo.pop_all()  # started: from here on RunningServer.stop undoes it all
    # The address bound (port 0 picks one), as the banner shows it; a --workers child
    # was given the supervisor's bound address as its AUTH_METRICS_LISTEN.
    metrics = settings.metrics_listen if endpoint is None else str(endpoint.address)
    _log_start_up(settings, port, components, clock, metrics=metrics)
    background = [
        asyncio.create_task(
            settings_watch.run_forever(settings.janitor_interval), name="shared-settings"
        ),
        # A replica whose settings are no longer the shared ones leaves the database-wide
        # upkeep (rotation, retiring keys, purging by retention) to replicas that agree.
        asyncio.create_task(
            components.janitor.run_forever(may_run=lambda: settings_watch.agreeing),
            name="janitor",
        ),
    ]
    if isinstance(clock, DatabaseClock):

        async def serving(ok: bool) -> None:
            # Not ready while this host's clock is too far off (docs/operations.md, Clocks).
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
                sample_forever(telemetry, _sampler(components, feed, watch_hub, pool, clock)),
                name="metrics",
            )
        )
    return RunningServer(
        server=server,
        port=port,
        components=components,
        revocation_feed=feed,
        watch_hub=watch_hub,
        health=health,
        background=background,
        stream_budget=stream_budget,
        unary_budget=unary_budget,
        settings_watch=settings_watch,
        listening_sockets=listening_sockets,
        telemetry=telemetry,
        metrics_endpoint=endpoint,
    )


async def _serve_grpc(
    settings: Settings,
    components: Components,
    health: health_async.HealthServicer,
    telemetry: PrometheusTelemetry | None,
    directory: ServiceDirectory | None,
    unary_budget: UnaryBudget,
    stream_budget: StreamBudget,
    watch_hub: RevocationWatchHub,
    credentials: grpc.ServerCredentials | None,
    listen: str | None,
    reuse_port: bool,
) -> tuple[grpc.aio.Server, int, frozenset[int]]:
    """The gRPC server with every service and interceptor, bound and started; its port
    and the inodes of the sockets it listens on.

    The interceptors are not given to grpc.aio (which would ask each of them on every
    call): each method's handler is wrapped in them once, when it is registered
    (`LayeredRegistration`), in the order grpc.aio would apply them.
    """
    interceptors: list[MetricsInterceptor | CallBudgetInterceptor | CallerAuthInterceptor] = []
    if telemetry is not None:
        # First, so refused calls are counted too.
        interceptors.append(MetricsInterceptor(telemetry))
    # Before the caller check, so calls that fail it are held to the budgets too.
    interceptors.append(CallBudgetInterceptor(unary_budget, stream_budget))
    refusals = AdminRefusals(components.users)
    if directory is not None:
        interceptors.append(
            CallerAuthInterceptor(
                directory=directory,
                guarded=settings.caller_auth,
                on_admin_refused=refusals.count,
                log_window=settings.event_aggregation_window,
            )
        )
    server = grpc.aio.server(
        # CallBudgetInterceptor refuses calls beyond their own budget at once
        # (RESOURCE_EXHAUSTED); gRPC's limit, both budgets together, also counts the calls
        # whose request has not arrived, which the budgets never see.
        maximum_concurrent_rpcs=calls_limit(settings),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Off unless we are one of several workers: a second server started
            # by mistake must fail to bind, not silently share the port.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *transport_options(settings),
        ],
    )
    registration = LayeredRegistration(server, [i.wrap for i in interceptors])
    add_auth_servicer(
        AuthServicer(
            tokens=components.tokens,
            validator=components.validator,
            revoke=components.revoke,
            keys=components.signing_keys,
            watch=watch_hub,
        ),
        registration,
    )
    add_admin_servicer(
        AdminServicer(users=components.users, keys=components.signing_keys, refusals=refusals),
        registration,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, registration)
    # What reflection.enable_server_reflection does for a grpc.aio server.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            (
                AUTH_SERVICE_NAME,
                ADMIN_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
        ),
        registration,
    )
    address = listen or settings.listen
    listening_before = listening_tcp_sockets()
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
    return server, port, listening_tcp_sockets(port) - listening_before


def _log_start_up(
    settings: Settings, port: int, components: Components, clock: Clock, *, metrics: str | None
) -> None:
    """One line an operator can check the deployment against (no secrets in it); `metrics`
    is the metrics address bound, None when off."""
    signing = components.signing_keys.ring.signing_key(clock.now())
    log.info(
        "serving auth.v1 on port %d: tls=%s client-certificates=%s caller-auth=%s metrics=%s "
        "signing-key=%s/%s access-ttl=%ds refresh-idle=%ds refresh-absolute=%ds "
        "reuse-grace=%ds login-throttle=%s key-rotation=%s",
        port,
        "on" if settings.tls_cert else "off",
        "required" if settings.tls_client_ca else "off",
        ",".join(sorted(settings.caller_auth)) or "off",
        metrics or "off",
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
    components: Components,
    feed: RevocationFeed,
    watch_hub: RevocationWatchHub,
    pool: asyncpg.Pool,
    clock: Clock,
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
            revocation_log_sequence=components.revocations.sequence,
            revocation_watchers=watch_hub.watchers,
            watch_updates_sent=watch_hub.updates_sent,
            watchers_cut_off=watch_hub.cut_off,
        )

    return take_sample
