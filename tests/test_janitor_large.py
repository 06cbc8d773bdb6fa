"""The janitor on a large database (marked `slow`: `make test` runs these, `make test-fast`
leaves them out): 1.5 million live sessions (15 per user, 4 refresh tokens each: 6.4
million tokens), 11 million security events, 1.2 million throttle rows.

Every purge batch finds its rows through an index (no sequential scan of a large table, by
EXPLAIN, with the parameters of a first call and as a generic plan, and a few pages read
when nothing is left to delete), so a pass under the real AUTH_DB_TIMEOUT (5 s) finishes,
deletes what is old in every table, and each step stays within its time budget. Migration
0010 and the back-fill of `purge_after` it leaves to the janitor finish on such a table
too. The rows are seeded with SQL, one statement per kind. The sizes and times are in the
README (Operating: Clean-up).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from service.clock import ManualClock, to_datetime
from service.domain.janitor import BATCH, STEP_BUDGET
from service.domain.revocation import forgettable_before
from service.settings import Settings
from service.store import apply_migrations
from service.store.invariants import family_invariant_violations
from service.store.janitor import _PURGE_SQL, BACKFILL_PURGE_AFTER_SQL
from service.store.migrations import load_migrations
from tests.live_server import (
    LiveServer,
    ServerFactory,
    start_live_server,
    stop_live_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

USERS = 100_000
SESSIONS_PER_USER = 15  # 1.5 million live sessions
LIVE_SESSIONS = USERS * SESSIONS_PER_USER
TOKENS_PER_SESSION = 4  # three rotated, the current one: 6.4 million tokens
DEAD_SESSIONS = 100_000
DELETED_USERS_WITH_SESSIONS = 20_000  # walked past: their sessions are still there
DELETED_USERS = 10_000  # to delete
OLD_EVENTS, NEW_EVENTS = 1_000_000, 10_000_000
OLD_THROTTLE, NEW_THROTTLE = 200_000, 1_000_000
RETENTION = 86_400
THROTTLE_WINDOW = 600
LARGE_TABLES = {"sessions", "refresh_tokens", "users", "security_events", "login_throttle"}
JANITOR = "service.domain.janitor"
_PEER_SQL = "'ipv4:10.' || (i % 250) || '.' || (i / 250 % 250) || '.' || (i % 199) || ':443'"
_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"


def _uuid_sql(prefix: str, number: str) -> str:
    """An ascending uuid from an integer SQL expression."""
    return f"('00000000-0000-4000-{prefix}-' || lpad(to_hex({number}), 12, '0'))::uuid"


def _token_hash_sql(k: str) -> str:
    """The hash of the session's `k`-th refresh token (ascending with k, then session)."""
    hex_digits = f"lpad(to_hex({k}), 8, '0') || replace(s.id::text, '-', '') || repeat('0', 24)"
    return f"decode({hex_digits}, 'hex')"


async def _seed_sessions(
    conn: asyncpg.Connection, now: datetime, *, purge_after: bool
) -> dict[str, float]:
    """Users, live and dead sessions and their token chains, one INSERT ... SELECT each;
    seconds each took. Keys ascend, so seeding appends to each index; each session's
    tokens lie far apart, as rotations made over time leave them. Without `purge_after`:
    the schema before migration 0010."""
    took: dict[str, float] = {}
    column = ", purge_after" if purge_after else ""

    async def run(name: str, sql: str) -> None:
        started = time.monotonic()
        await conn.execute(sql, *([now] if "$1" in sql else []))
        took[name] = took.get(name, 0.0) + time.monotonic() - started

    await run(
        "users",
        f"""INSERT INTO users (id, username, username_key, password_hash, created_at, updated_at)
            SELECT {_uuid_sql("8000", "i")}, 'bulk-' || i, 'bulk-' || i, 'x',
                   $1::timestamptz - interval '30 days', $1::timestamptz - interval '30 days'
              FROM generate_series(1, {USERS}) i""",
    )
    # Live: refreshable for a week more, their last access token expired an hour ago.
    await run(
        "live sessions",
        f"""INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                  peer, user_agent, access_expires_max{column})
            SELECT {_uuid_sql("8000", "i")},
                   {_uuid_sql("8000", f"(i - 1) / {SESSIONS_PER_USER} + 1")},
                   '{{read,write}}', 'live', $1::timestamptz - interval '1 day',
                   $1::timestamptz + interval '29 days', {_PEER_SQL}, '{_USER_AGENT}',
                   $1::timestamptz - interval '1 hour'
                   {", $1::timestamptz + interval '7 days'" if purge_after else ""}
              FROM generate_series(1, {LIVE_SESSIONS}) i""",
    )
    # Dead: past their absolute lifetime ten days ago.
    await run(
        "dead sessions",
        f"""INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at,
                                  peer, user_agent, access_expires_max{column})
            SELECT {_uuid_sql("9000", "i")}, {_uuid_sql("8000", f"i % {USERS} + 1")},
                   '{{read,write}}', 'dead', $1::timestamptz - interval '40 days',
                   $1::timestamptz - interval '10 days', {_PEER_SQL}, '{_USER_AGENT}',
                   $1::timestamptz - interval '10 days'
                   {", $1::timestamptz - interval '10 days'" if purge_after else ""}
              FROM generate_series(1, {DEAD_SESSIONS}) i""",
    )
    # Each session: a chain of rotated tokens, the last one unused (a week to live).
    for k in range(1, TOKENS_PER_SESSION + 1):
        last = k == TOKENS_PER_SESSION
        await run(
            "refresh tokens",
            f"""INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at,
                                            expires_at, used_at, child_hash)
                SELECT {_token_hash_sql(str(k))}, s.id,
                       {_token_hash_sql(str(k - 1)) if k > 1 else "NULL"},
                       s.created_at + {k} * interval '1 minute',
                       least(s.expires_at, {"$1::timestamptz" if last else "s.created_at"}
                                           + interval '7 days'),
                       {"NULL" if last else f"s.created_at + {k + 1} * interval '1 minute'"},
                       {"NULL" if last else _token_hash_sql(str(k + 1))}
                  FROM sessions s""",
        )
    return took


async def _seed_the_rest(conn: asyncpg.Connection, now: datetime) -> dict[str, float]:
    took: dict[str, float] = {}

    async def run(name: str, sql: str) -> None:
        started = time.monotonic()
        await conn.execute(sql, now)
        took[name] = time.monotonic() - started

    # Deleted users: some still have sessions (the walk goes past them), some are done.
    await run(
        "deleted users",
        f"""WITH marked AS (
                UPDATE users SET deleted_at = $1::timestamptz - interval '20 days'
                 WHERE id <= {_uuid_sql("8000", str(DELETED_USERS_WITH_SESSIONS))}
                RETURNING 1)
            INSERT INTO users (id, username, username_key, password_hash, created_at,
                               updated_at, deleted_at)
            SELECT {_uuid_sql("a000", "i")}, 'gone-' || i, 'gone-' || i, '!',
                   $1::timestamptz - interval '30 days', $1::timestamptz - interval '20 days',
                   $1::timestamptz - interval '20 days' + i * interval '1 ms'
              FROM generate_series(1, {DELETED_USERS}) i""",
    )
    await run(
        "security events",
        f"""INSERT INTO security_events (occurred_at, last_occurred_at, kind, detail)
            SELECT t, t, 'bulk', '{{}}'
              FROM (SELECT CASE WHEN i <= {OLD_EVENTS}
                           THEN $1::timestamptz - interval '2 days' + i * interval '1 ms'
                           ELSE $1::timestamptz - interval '3 hours' + i * interval '1 ms'
                           END AS t
                      FROM generate_series(1, {OLD_EVENTS + NEW_EVENTS}) i) e""",
    )
    await run(
        "throttle rows",
        f"""INSERT INTO login_throttle (key, failures, last_failure_at, pending)
            SELECT 'peer:bulk-' || lpad(i::text, 8, '0'), 3,
                   CASE WHEN i <= {OLD_THROTTLE} THEN $1::timestamptz - interval '1 day'
                        ELSE $1::timestamptz - interval '1 minute' END, 0
              FROM generate_series(1, {OLD_THROTTLE + NEW_THROTTLE}) i""",
    )
    started = time.monotonic()
    await conn.execute("ANALYZE")
    took["analyze"] = time.monotonic() - started
    return took


def _scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, relation) of every node of an EXPLAIN (FORMAT JSON) plan."""
    found = [(plan["Node Type"], plan.get("Relation Name", ""))]
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


def _purge_statements(now: datetime) -> dict[str, tuple[str, tuple[object, ...]]]:
    """Each step's statement, with the arguments of a first batch."""
    dead_before = to_datetime(forgettable_before(now.timestamp()))
    cutoffs = {
        "sessions": dead_before,
        "users": dead_before,
        "signing_keys": now - timedelta(seconds=RETENTION),
        "security_events": now - timedelta(seconds=RETENTION),
        "login_throttle": now - timedelta(seconds=THROTTLE_WINDOW),
        "revocation_log": now,
    }
    statements: dict[str, tuple[str, tuple[object, ...]]] = {
        "sessions_backfill": (BACKFILL_PURGE_AFTER_SQL, (BATCH,))
    }
    for table, sql in _PURGE_SQL.items():
        args: tuple[object, ...] = (cutoffs[table], BATCH)
        if table == "users":
            args += (now - timedelta(days=365), uuid.UUID(int=0))
        statements[table] = (sql, args)
    return statements


async def _assert_index_only_plans(
    conn: asyncpg.Connection, now: datetime, *, steps: set[str] | None = None
) -> None:
    """No purge statement (of `steps`, default all) scans a large table sequentially."""
    statements = _purge_statements(now)
    for mode in ("force_custom_plan", "force_generic_plan"):
        await conn.execute(f"SET plan_cache_mode = {mode}")
        for name, (sql, args) in statements.items():
            if steps is not None and name not in steps:
                continue
            prepared = await conn.prepare(f"EXPLAIN (FORMAT JSON) {sql}")
            plan = json.loads(await prepared.fetchval(*args))[0]["Plan"]
            seq = [rel for node, rel in _scans(plan) if node == "Seq Scan" and rel in LARGE_TABLES]
            assert not seq, f"{name} ({mode}) scans {seq} sequentially:\n{json.dumps(plan)}"
    await conn.execute("RESET plan_cache_mode")


async def _assert_little_work_when_nothing_is_left(conn: asyncpg.Connection, now: datetime) -> None:
    """With nothing left to delete, each statement touches a few pages per row of one
    batch at most, not the table
    (the defect: a scan of every live session, on every batch and every pass)."""
    for name, (sql, args) in _purge_statements(now).items():
        prepared = await conn.prepare(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        started = time.monotonic()
        plan = json.loads(await prepared.fetchval(*args))[0]["Plan"]
        took = time.monotonic() - started
        pages = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        print(f"{name}, nothing left: {pages} pages, {took * 1000:.1f} ms")
        # A few pages per row of a batch (users: a batch of those whose sessions remain).
        assert pages < 10 * BATCH, f"{name} touched {pages} pages to find nothing"


async def _count(conn: asyncpg.Connection, sql: str) -> int:
    return int(await conn.fetchval(sql))


def _janitor_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == JANITOR]


async def test_clean_up_finishes_on_a_large_database(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server: LiveServer = await server_factory(
        db_timeout=5.0,
        event_retention=RETENTION,
        throttle_window=THROTTLE_WINDOW,
        janitor_interval=86_400,  # only the passes this test runs
    )
    now = to_datetime(server.clock.now())
    assert server.settings.database_url is not None
    conn = await asyncpg.connect(server.settings.database_url)
    try:
        seeded = await _seed_sessions(conn, now, purge_after=True)
        seeded |= await _seed_the_rest(conn, now)
        print(f"\nseeding (s): { {k: round(v, 1) for k, v in seeded.items()} }")
        await _assert_index_only_plans(conn, now)

        janitor = server.running.components.janitor
        passes = []
        with caplog.at_level(logging.INFO, logger=JANITOR):
            for _ in range(10):
                started = time.monotonic()
                deleted = await janitor.run_once()
                took = time.monotonic() - started
                assert deleted is not None
                passes.append((round(took, 1), deleted))
                # Liveness: every step stops at its budget (plus the batch under way).
                assert took < 6 * (STEP_BUDGET + 5) + 10
                if not any(deleted.values()):
                    break
        print("\n".join(_janitor_lines(caplog)))
        print(f"passes (s, deleted): {passes}")
        assert not [r for r in caplog.records if r.name == JANITOR and r.levelno >= logging.WARNING]
        await _assert_little_work_when_nothing_is_left(conn, now)
        assert await _count(conn, "SELECT count(*) FROM sessions WHERE audience = 'dead'") == 0
        live = "SELECT count(*) FROM sessions WHERE audience = 'live'"
        assert await _count(conn, live) == LIVE_SESSIONS
        tokens = "SELECT count(*) FROM refresh_tokens"
        assert await _count(conn, tokens) == LIVE_SESSIONS * TOKENS_PER_SESSION
        assert await _count(conn, "SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == (
            DELETED_USERS_WITH_SESSIONS
        )
        events = "SELECT count(*) FROM security_events WHERE kind = 'bulk'"
        assert await _count(conn, events) == NEW_EVENTS
        assert await _count(conn, "SELECT count(*) FROM login_throttle") == NEW_THROTTLE
    finally:
        await conn.close()


async def test_migration_and_back_fill_finish_on_a_large_table(
    empty_database: str, settings: Settings, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """1.5 million sessions from before migration 0010: the migration adds the column and
    its index (nothing rewritten under its lock), and the janitor fills purge_after a
    batch at a time, within its budget per pass, with the values the rows give."""
    now = to_datetime(clock.now())
    conn = await asyncpg.connect(empty_database)
    try:
        migrations = load_migrations()
        index = next(i for i, m in enumerate(migrations) if m.name == "0010_purge_indexes.sql")
        await apply_migrations(conn, migrations[:index])
        seeded = await _seed_sessions(conn, now, purge_after=False)
        await conn.execute("ANALYZE")
        started = time.monotonic()
        await apply_migrations(conn, migrations[: index + 1], statement_timeout=600)
        migrated = time.monotonic() - started
        print(f"\nseeding (s): { {k: round(v, 1) for k, v in seeded.items()} }")
        print(f"migration 0010 on {LIVE_SESSIONS + DEAD_SESSIONS} sessions: {migrated:.1f} s")
        assert migrated < settings.migration_timeout
        await apply_migrations(conn)
        await conn.execute("ANALYZE sessions")
        await _assert_index_only_plans(conn, now, steps={"sessions_backfill", "sessions"})
    finally:
        await conn.close()

    server = await start_live_server(
        replace(settings, database_url=empty_database, janitor_interval=86_400), clock
    )
    try:
        unfilled = "SELECT count(*) FROM sessions WHERE purge_after IS NULL"
        total = LIVE_SESSIONS + DEAD_SESSIONS
        assert await _count(server.pool, unfilled) == total
        passes = []
        with caplog.at_level(logging.INFO, logger=JANITOR):
            for _ in range(6):
                started = time.monotonic()
                await server.running.components.janitor.run_once()
                took = time.monotonic() - started
                left = await _count(server.pool, unfilled)
                passes.append((round(took, 1), left))
                assert took < 6 * (STEP_BUDGET + 5) + 10
                if not left:
                    break
        print("\n".join(_janitor_lines(caplog)))
        print(f"passes (s, sessions left to fill): {passes}")
        assert passes[0][1] < total, "the first pass makes progress"
        assert passes[-1][1] == 0
        # Filled, the dead ones go (by the next pass at the latest).
        await server.running.components.janitor.run_once()
        assert await _count(server.pool, "SELECT count(*) FROM sessions") == LIVE_SESSIONS
        assert not [r for r in caplog.records if r.name == JANITOR and r.levelno >= logging.WARNING]
        # Every filled value is the one the rows give (a check over the whole table: no
        # per-call timeout).
        conn = await asyncpg.connect(empty_database)
        try:
            problems = await family_invariant_violations(conn, now=now)
        finally:
            await conn.close()
        assert not problems, "\n".join(problems[:10])
    finally:
        await stop_live_server(server)
