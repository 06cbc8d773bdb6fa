"""Apply the ordered `migrations/NNNN_name.sql` files, each once, in its own transaction.

A file may hold `-- authsvc:step NAME` lines: there, inside the same transaction, the
Python function `_STEPS[NAME]` runs (for what SQL cannot compute, such as the Unicode
case fold of usernames). A step refuses with `MigrationRefused`, and the whole
migration rolls back.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg

from service.domain.usernames import MAX_USERNAME_KEY_BYTES, escape_text, username_key

_NAME_RE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_STEP_RE = re.compile(r"^-- authsvc:step ([a-z0-9_]+)[ \t]*$", re.MULTILINE)
# Held while migrating so that replicas starting together apply each file once.
_MIGRATION_LOCK_ID = 0x6D696772  # "migr"


class MigrationRefused(RuntimeError):
    """The database holds data a migration cannot carry over; the message says which rows
    and what to do. Start-up stops with it (nothing of the migration is applied)."""


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


async def apply_migrations(
    conn: asyncpg.Connection, migrations: Sequence[Migration] | None = None
) -> list[str]:
    """Apply pending migrations (of `migrations`, by default every shipped one); returns
    the names of those applied now. Raises MigrationRefused if one cannot be applied to
    the data there is."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations() if migrations is None else migrations:
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
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
    return applied_now
