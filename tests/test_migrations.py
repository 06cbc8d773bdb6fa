"""Migrations on a database that already holds data: existing rows get safe values."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from service.clock import ManualClock, to_datetime
from service.failures import EXIT_SCHEMA_MISMATCH
from service.settings import Settings
from service.store import apply_migrations
from service.store.migrations import SchemaGap, check_schema, load_migrations
from tests.live_server import TEST_KEK, start_live_server, stop_live_server
from tests.test_cli import _authsvc, _env

TEN_YEARS = timedelta(seconds=315_360_000)


async def _migrate_until(conn: asyncpg.Connection, name_part: str) -> None:
    """Apply the migrations before the one whose file name contains `name_part`, through
    `apply_migrations` (so migrations with Python steps run as they do in production)."""
    migrations = load_migrations()
    for index, migration in enumerate(migrations):
        if name_part in migration.name:
            await apply_migrations(conn, migrations[:index])
            return
    raise AssertionError(f"no migration named *{name_part}*")


async def test_existing_sessions_get_a_bound_past_any_token_they_could_have_issued(
    empty_database: str, settings: Settings, clock: ManualClock
) -> None:
    """Sessions from before `access_expires_max` existed: their tokens were signed under an
    access TTL nobody recorded, so they get their last activity + the largest TTL the
    settings accept (+ the longest grace for a replay, + a margin); a revoked one is
    remembered by a server with a short TTL long after the old rule forgot it."""
    t0 = to_datetime(clock.now() - 1000)
    conn = await asyncpg.connect(empty_database)
    try:
        await _migrate_until(conn, "access_expires_max")
        user_id = uuid.uuid4()
        await conn.execute(
            """INSERT INTO users (id, username, username_key, password_hash, created_at,
                                  updated_at)
               VALUES ($1, 'old', 'old', 'x', $2, $2)""",
            user_id,
            t0,
        )
        fresh, rotated, revoked = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for sid in (fresh, rotated, revoked):
            await conn.execute(
                """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at)
                   VALUES ($1, $2, '{}', 'a', $3, $4)""",
                sid,
                user_id,
                t0,
                t0 + timedelta(days=30),
            )
        # Rotated 500 s after login; the rotated token's row records when.
        await conn.execute(
            "UPDATE sessions SET last_refreshed_at = $2 WHERE id = $1",
            rotated,
            t0 + timedelta(seconds=500),
        )
        await conn.execute(
            """INSERT INTO refresh_tokens
                      (token_hash, session_id, issued_at, expires_at, used_at, child_hash)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            bytes(32),
            rotated,
            t0,
            t0 + timedelta(days=1),
            t0 + timedelta(seconds=500),
            bytes(range(32)),
        )
        await conn.execute(
            "UPDATE sessions SET revoked_at = $2, revoke_reason = 'old' WHERE id = $1",
            revoked,
            t0 + timedelta(seconds=10),
        )

        await apply_migrations(conn)

        rows = await conn.fetch("SELECT id, access_expires_max FROM sessions")
        bounds = {r["id"]: r["access_expires_max"] for r in rows}
        slack = timedelta(seconds=300 + 60)
        assert bounds[fresh] == t0 + TEN_YEARS + slack
        assert bounds[revoked] == t0 + TEN_YEARS + slack
        assert bounds[rotated] == t0 + timedelta(seconds=500) + TEN_YEARS + slack
        column = await conn.fetchrow(
            """SELECT is_nullable, column_default FROM information_schema.columns
                WHERE table_name = 'sessions' AND column_name = 'access_expires_max'"""
        )
        assert column is not None
        assert (column["is_nullable"], column["column_default"]) == ("NO", None)
    finally:
        await conn.close()

    # A server with a 60 s access TTL, long after the old rule (TTL + 60 s) forgot it.
    server = await start_live_server(
        replace(settings, database_url=empty_database, access_ttl=60), clock
    )
    try:
        await server.running.components.janitor.run_once()
        assert server.running.components.revocations.is_revoked(str(revoked))
        assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 3
    finally:
        await stop_live_server(server)


async def test_existing_users_get_a_bound_covering_their_sessions_and_generation_zero(
    empty_database: str, settings: Settings, clock: ManualClock
) -> None:
    """Migration 0008: each existing user's bound is the latest of their sessions' (or the
    epoch without any), every user and session starts at generation 0, and a revocation
    of such a user afterwards ends their existing sessions and is remembered that long."""
    t0 = to_datetime(clock.now())
    conn = await asyncpg.connect(empty_database)
    try:
        await _migrate_until(conn, "user_session_generation")
        busy, idle = uuid.uuid4(), uuid.uuid4()
        for user_id, name in ((busy, "busy"), (idle, "idle")):
            await conn.execute(
                """INSERT INTO users (id, username, username_key, password_hash, created_at,
                                      updated_at)
                   VALUES ($1, $2, $2, 'x', $3, $3)""",
                user_id,
                name,
                t0,
            )
        sessions = {uuid.uuid4(): t0 + timedelta(seconds=s) for s in (100, 900, 300)}
        for sid, bound in sessions.items():
            await conn.execute(
                """INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                         access_expires_max)
                   VALUES ($1, $2, '{}', 'a', $3, $4, $5)""",
                sid,
                busy,
                t0,
                t0 + timedelta(days=30),
                bound,
            )

        await apply_migrations(conn)

        users = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, access_expires_max, session_generation FROM users"
            )
        }
        assert users[busy]["access_expires_max"] == t0 + timedelta(seconds=900)
        assert users[idle]["access_expires_max"].timestamp() == 0
        assert {u["session_generation"] for u in users.values()} == {0}
        assert set(await conn.fetch("SELECT DISTINCT user_generation FROM sessions")) == {(0,)}
    finally:
        await conn.close()

    server = await start_live_server(replace(settings, database_url=empty_database), clock)
    try:
        users_directory = server.running.components.users
        assert await users_directory.set_disabled(busy, True) == 3
        state = server.running.components.revocations
        assert state.is_revoked_for_user(str(busy), 0)
        assert await server.pool.fetchval(
            "SELECT revoked_sessions_until FROM users WHERE id = $1", busy
        ) == t0 + timedelta(seconds=900)
    finally:
        await stop_live_server(server)


async def test_a_gap_in_schema_migrations_is_refused_naming_the_missing_versions(
    empty_database: str, tmp_path: Path
) -> None:
    """A row deleted from schema_migrations (by hand, or a botched restore) made `migrate`
    run that migration again over its own tables, which failed half-way. Now: refused
    naming the missing versions, nothing applied; the other commands (which only check the
    schema) refuse it the same way."""
    conn = await asyncpg.connect(empty_database)
    try:
        await apply_migrations(conn)
        await conn.execute("DELETE FROM schema_migrations WHERE version IN (3, 5)")
        with pytest.raises(SchemaGap) as caught:
            await apply_migrations(conn)
        message = str(caught.value)
        assert "versions 3 and 5" in message, message
        assert "\n" not in message
        with pytest.raises(SchemaGap):
            await check_schema(conn)
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        latest = load_migrations()[-1].version
        assert [r["version"] for r in versions] == [
            v for v in range(1, latest + 1) if v not in (3, 5)
        ]
    finally:
        await conn.close()


@pytest.mark.system
async def test_migrate_with_a_gap_exits_4_in_one_line(empty_database: str, tmp_path: Path) -> None:
    """`authsvc migrate` used to print asyncpg's DuplicateColumnError and a traceback."""
    conn = await asyncpg.connect(empty_database)
    try:
        await apply_migrations(conn)
        await conn.execute("DELETE FROM schema_migrations WHERE version IN (3, 5)")
    finally:
        await conn.close()
    env = _env(
        AUTH_DATABASE_URL=empty_database,
        AUTH_DATA_DIR=str(tmp_path / "data"),
        AUTH_KEK=base64.b64encode(TEST_KEK).decode(),
    )
    for command in (("migrate",), ("users", "list")):
        result = _authsvc(*command, env=env)
        assert result.returncode == EXIT_SCHEMA_MISMATCH, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("authsvc: ") and "versions 3 and 5" in lines[0], lines
