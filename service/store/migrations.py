"""Apply the ordered `migrations/NNNN_name.sql` files, each once, in its own transaction.

A file may hold `-- authsvc:step NAME` lines: there, inside the same transaction, the
Python function `_STEPS[NAME]` runs (for what SQL cannot compute, such as the Unicode
case fold of usernames). A step refuses with `MigrationRefused`, and the whole
migration rolls back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from importlib import resources

import asyncpg

from service.domain.usernames import MAX_USERNAME_KEY_BYTES, escape_text, username_key
from service.failures import EXIT_REFUSED, SchemaMismatch, StartupError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_STEP_RE = re.compile(r"^-- authsvc:step ([a-z0-9_]+)[ \t]*$", re.MULTILINE)
MIGRATION_LOCK_ID = 0x6D696772  # "migr"
"""The advisory lock held while migrating, so that replicas starting together apply each
file once."""
LOCK_PROGRESS_INTERVAL = 5.0
"""Seconds between the lines saying we still wait for the migration lock."""
_LOCK_POLL_INTERVAL = 0.2

# Who holds the migration lock: a single bigint key is stored as classid (high half) and
# objid (low half) with objsubid 1, per database.
_LOCK_HOLDER_SQL = """
    SELECT pid FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND classid = 0 AND objid = $1 AND objsubid = 1
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
     LIMIT 1"""


class MigrationRefused(StartupError):
    """The database holds data a migration cannot carry over; the message says which rows
    and what to do. Start-up stops with it (nothing of the migration is applied)."""

    exit_code = EXIT_REFUSED


_COLLISION_ADVICE = (
    "Rename or delete all but one of each group in the database (for example: "
    "UPDATE users SET username = 'alice-2' WHERE id = '...'), then start again."
)


async def _fill_username_keys(conn: asyncpg.Connection) -> None:
    """Give every user its username key; refuse if two live users would share one."""
    rows = await conn.fetch(
        "SELECT id, username, deleted_at IS NULL AS live FROM users ORDER BY created_at, id"
    )
    keys = {row["id"]: username_key(row["username"]) for row in rows}
    by_key: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        if row["live"]:
            by_key[keys[row["id"]]].append(row)
    problems = [
        " and ".join(f"'{escape_text(r['username'])}' (id {r['id']})" for r in group)
        for group in by_key.values()
        if len(group) > 1
    ]
    if problems:
        raise MigrationRefused(
            "usernames now compare without regard to case and Unicode form (NFKC), and these "
            f"users would become one account: {'; '.join(problems)}. {_COLLISION_ADVICE}"
        )
    too_long = [
        f"'{escape_text(r['username'])}' (id {r['id']})"
        for r in rows
        if r["live"] and len(keys[r["id"]].encode("utf-8")) > MAX_USERNAME_KEY_BYTES
    ]
    if too_long:
        raise MigrationRefused(
            f"these usernames are longer than {MAX_USERNAME_KEY_BYTES} bytes once normalised: "
            + "; ".join(too_long)
            + ". Rename them in the database, then start again."
        )
    await conn.executemany("UPDATE users SET username_key = $2 WHERE id = $1", list(keys.items()))


_STEPS: dict[str, Callable[[asyncpg.Connection], Awaitable[None]]] = {
    "fill_username_keys": _fill_username_keys,
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


class MigrationLockTimeout(TimeoutError):
    """Another session held the migration lock for longer than we may wait."""

    def __init__(self, waited: float, holder: int | None) -> None:
        super().__init__(f"the migration lock was held by pid {holder} for {waited:.0f}s")
        self.waited = waited
        self.holder = holder


class SchemaTooNew(SchemaMismatch):
    """The database was migrated by a newer authsvc than this one."""

    def __init__(self, database_version: int, latest: int) -> None:
        super().__init__(
            f"the database schema is at version {database_version}, newer than this authsvc "
            f"knows (version {latest}): run the authsvc release that migrated it, or a newer one"
        )


class SchemaTooOld(SchemaMismatch):
    """The database lacks migrations this authsvc needs."""

    def __init__(self, database_version: int, latest: int) -> None:
        super().__init__(
            f"the database schema is at version {database_version}, this authsvc needs "
            f"version {latest}: run `authsvc migrate` (or start `authsvc serve`) first"
        )


class SchemaGap(SchemaMismatch):
    """Versions below the newest applied are missing from schema_migrations: a row deleted
    by hand or a partial restore. Which of their changes the schema holds is unknown, so
    nothing is applied (running one again would fail half-way over its own tables)."""

    def __init__(self, missing: Sequence[int], newest: int) -> None:
        shown = [str(v) for v in missing[:10]] + (
            [f"{len(missing) - 10} more"] if len(missing) > 10 else []
        )
        listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
        super().__init__(
            f"schema_migrations lacks version{'s' if len(missing) > 1 else ''} {listed} below "
            f"its newest, {newest}: the schema is in an unknown state and nothing was "
            "applied. If those migrations were applied, insert their rows again (version and "
            "file name); if not, restore the database from a backup"
        )


def load_migrations() -> list[Migration]:
    """The migration files shipped in the package, in version order."""
    folder = resources.files("service.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME_RE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must run 1..N without gaps, found {versions}")
    for migration in found:
        for step in _STEP_RE.findall(migration.sql):
            if step not in _STEPS:
                raise RuntimeError(f"{migration.name}: no migration step named {step}")
    return found


async def _run(conn: asyncpg.Connection, migration: Migration) -> None:
    # re.split with one group: SQL, step name, SQL, step name, ..., SQL.
    parts = _STEP_RE.split(migration.sql)
    for index, part in enumerate(parts):
        if index % 2:
            await _STEPS[part](conn)
        elif part.strip():
            await conn.execute(part)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The newest migration applied to the database (0: none, or no schema at all)."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    return 0 if version is None else int(version)


def _check_no_gap(done: AbstractSet[int], latest: int) -> None:
    """SchemaTooNew past `latest`; SchemaGap if a version below the newest is missing."""
    newest = max(done, default=0)
    if newest > latest:
        raise SchemaTooNew(newest, latest)
    missing = [version for version in range(1, newest) if version not in done]
    if missing:
        raise SchemaGap(missing, newest)


async def _applied_versions(conn: asyncpg.Connection) -> set[int]:
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def check_schema(conn: asyncpg.Connection) -> None:
    """Refuse a database whose schema is not exactly the one this binary was built for
    (commands other than `migrate` and `serve` migrate nothing by the way)."""
    latest = load_migrations()[-1].version
    version = await schema_version(conn)
    if version > latest:
        raise SchemaTooNew(version, latest)
    if version < latest:
        raise SchemaTooOld(version, latest)
    _check_no_gap(await _applied_versions(conn), latest)


async def apply_migrations(
    conn: asyncpg.Connection,
    migrations: Sequence[Migration] | None = None,
    *,
    lock_timeout: float | None = None,
    statement_timeout: float | None = None,
) -> list[str]:
    """Apply pending migrations (of `migrations`, by default every shipped one); returns
    the names of those applied now. Raises MigrationRefused if one cannot be applied to
    the data there is.

    Waits for the migration lock another session holds (at most `lock_timeout` seconds;
    None: for as long as it takes), logging who holds it every `LOCK_PROGRESS_INTERVAL`;
    each statement may run `statement_timeout` seconds (None: no limit). A database
    migrated further than this binary knows is refused (`SchemaTooNew`), untouched.
    """
    latest = load_migrations()[-1].version
    if migrations is None:
        migrations = load_migrations()
    await conn.execute(
        "SELECT set_config('statement_timeout', $1, false)",
        "0" if statement_timeout is None else f"{max(1, int(statement_timeout * 1000))}ms",
    )
    await _take_lock(conn, lock_timeout)
    applied_now: list[str] = []
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await _applied_versions(conn)
        _check_no_gap(done, latest)
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                try:
                    await _run(conn, migration)
                except MigrationRefused as exc:
                    raise MigrationRefused(f"migration {migration.name}: {exc}") from None
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def _take_lock(conn: asyncpg.Connection, limit: float | None) -> None:
    """The migration lock, polled (each try returns at once, so no per-call timeout cuts
    the wait short), with a line now and then naming the session that holds it."""
    started = time.monotonic()
    reported = None
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID):
        now = time.monotonic()
        waited = now - started
        given_up = limit is not None and waited >= limit
        if given_up or reported is None or now - reported >= LOCK_PROGRESS_INTERVAL:
            holder = await conn.fetchval(_LOCK_HOLDER_SQL, MIGRATION_LOCK_ID)
            if given_up:
                raise MigrationLockTimeout(waited, holder)
            log.warning(
                "waiting for the migration lock held by pid %s (another replica migrating?); "
                "waited %.0fs%s",
                holder,
                waited,
                "" if limit is None else f" of {limit:.0f}s",
            )
            reported = now
        await asyncio.sleep(_LOCK_POLL_INTERVAL)
