"""Start-up and command failures as an operator meets them: real `authsvc` processes on the
test's database; every failure is one line (a JSON object with AUTH_LOG_FORMAT=json) and a
documented exit code, and no command invents key material it was not asked for."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import asyncpg
import pytest

from service.store.migrations import load_migrations
from tests.live_server import TEST_KEK
from tests.test_cli import _authsvc, _env, _jwks_kids, _server_env, _serving

OTHER_KEK = bytes(range(100, 132))
LATEST = load_migrations()[-1].version
# The advisory lock every replica takes to migrate (service/store/migrations.py).
MIGRATION_LOCK_ID = 0x6D696772


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line the failed command wrote to stderr (and nothing on stdout)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == "", result.stdout
    return lines[0]


def _failure(result: subprocess.CompletedProcess[str], log_format: str) -> str:
    """The message of a one-line failure, in the format asked for."""
    line = _one_line(result)
    if log_format == "json":
        record = json.loads(line)
        assert record["level"] == "ERROR"
        assert record["exit_code"] == result.returncode
        assert {"time", "logger", "message", "pid"} <= record.keys()
        message = record["message"]
        assert isinstance(message, str)
        return message
    assert line.startswith("authsvc: "), line
    return line


async def _key_material_rows(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        keys = await conn.fetchval("SELECT count(*) FROM signing_keys")
        secrets = await conn.fetchval("SELECT count(*) FROM server_secrets")
    finally:
        await conn.close()
    return int(keys), int(secrets)


# Item 3: only serve and explicit key commands create key material.


@pytest.mark.system
async def test_operator_commands_without_a_kek_create_no_key_material(
    database_url: str, tmp_path: Path
) -> None:
    """`users list` and friends on a fresh database with AUTH_KEK unset: no KEK file, no
    signing key, no refresh secret; the real server with its KEK starts afterwards."""
    data_dir = tmp_path / "data"
    env = _env(AUTH_DATABASE_URL=database_url, AUTH_DATA_DIR=str(data_dir))
    for args, stdin in (
        (("users", "list"), ""),
        (("users", "create", "ada", "--password-stdin"), "correct horse battery staple\n"),
        (("users", "disable", "ada"), ""),
        (("keys", "list"), ""),
        (("keys", "retire"), ""),
        (("events",), ""),
        (("migrate",), ""),
    ):
        result = _authsvc(*args, env=env, stdin=stdin)
        assert result.returncode == 0, (args, result.stderr)
    assert not (data_dir / "kek").exists()
    assert await _key_material_rows(database_url) == (0, 0)

    server_env = _server_env(database_url, tmp_path, AUTH_KEK=_b64(TEST_KEK))
    with _serving(server_env) as (port, _):
        assert len(_jwks_kids(port)) == 1
    assert await _key_material_rows(database_url) == (1, 1)


@pytest.mark.system
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_with_a_database_url_and_no_kek_refuses_in_one_line(
    database_url: str, tmp_path: Path, workers: str
) -> None:
    env = _env(
        AUTH_DATABASE_URL=database_url,
        AUTH_DATA_DIR=str(tmp_path / "data"),
        AUTH_LISTEN="127.0.0.1:0",
        AUTH_WORKERS=workers,
    )
    for args in (("serve",), ("keys", "rotate")):
        result = _authsvc(*args, env=env)
        assert result.returncode == 2, result.stderr
        line = _failure(result, "text")
        assert "AUTH_KEK" in line and "set" in line
    assert not (tmp_path / "data" / "kek").exists()
    assert await _key_material_rows(database_url) == (0, 0)


@pytest.mark.system
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_wrong_kek_is_one_line_naming_auth_kek(
    database_url: str, tmp_path: Path, log_format: str
) -> None:
    good = _server_env(database_url, tmp_path, AUTH_KEK=_b64(TEST_KEK))
    assert _authsvc("keys", "rotate", env=good).returncode == 0
    before = await _key_material_rows(database_url)
    wrong = {**good, "AUTH_KEK": _b64(OTHER_KEK), "AUTH_LOG_FORMAT": log_format}
    for args in (("serve",), ("keys", "rotate")):
        for workers in ("1", "2"):
            result = _authsvc(*args, env={**wrong, "AUTH_WORKERS": workers})
            assert result.returncode == 2, result.stderr
            message = _failure(result, log_format)
            assert "AUTH_KEK" in message
            assert _b64(OTHER_KEK) not in result.stderr and _b64(TEST_KEK) not in result.stderr
    # Nothing was sealed under the wrong key.
    assert await _key_material_rows(database_url) == before
    with _serving(good) as (port, _):
        assert len(_jwks_kids(port)) == 2


@pytest.mark.system
async def test_a_wrong_kek_refuses_before_creating_a_key_beside_a_stored_secret(
    database_url: str, tmp_path: Path
) -> None:
    """A database holding only the refresh secret (its keys retired and purged): a wrong
    KEK must not create a first signing key under itself before failing on the secret."""
    good = _server_env(database_url, tmp_path, AUTH_KEK=_b64(TEST_KEK), AUTH_WORKERS="1")
    with _serving(good):
        pass
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM signing_keys")
    finally:
        await conn.close()
    result = _authsvc("serve", env={**good, "AUTH_KEK": _b64(OTHER_KEK)})
    assert result.returncode == 2, result.stderr
    assert "AUTH_KEK" in _failure(result, "text")
    assert await _key_material_rows(database_url) == (0, 1)


# Item 11: one line and an exit code for every failure.


@pytest.mark.system
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_unreachable_database_is_one_line(tmp_path: Path, log_format: str) -> None:
    password = "pw-" + uuid.uuid4().hex
    env = _env(
        AUTH_DATABASE_URL=f"postgresql://authsvc:{password}@127.0.0.1:1/authsvc",
        AUTH_KEK=_b64(TEST_KEK),
        AUTH_DATA_DIR=str(tmp_path / "data"),
        AUTH_LISTEN="127.0.0.1:0",
        AUTH_DB_TIMEOUT="2",
        AUTH_LOG_FORMAT=log_format,
    )
    for args in (("serve",), ("serve", "--workers", "1"), ("migrate",), ("users", "list")):
        result = _authsvc(*args, env=env)
        assert result.returncode == 3, result.stderr
        message = _failure(result, log_format)
        assert "database" in message
        assert password not in result.stderr


@pytest.mark.system
def test_an_operators_mistake_is_one_line_not_a_bug(tmp_path: Path) -> None:
    """A database URL asyncpg cannot parse and a data directory that cannot be one are the
    operator's to fix (exit 2, one line, no password), not "unexpected" (70, a traceback)."""
    password = "pw-" + uuid.uuid4().hex
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        {
            "AUTH_DATABASE_URL": f"postgresql://u:{password}@h:notaport/x",
            "AUTH_KEK": _b64(TEST_KEK),
        },
        {"AUTH_DATABASE_URL": f"postgresql://u:{password}@[bad/x", "AUTH_KEK": _b64(TEST_KEK)},
        {"AUTH_DATA_DIR": str(a_file)},
        {"AUTH_DATA_DIR": str(a_file / "below-a-file")},
    ]
    for case in cases:
        result = _authsvc("users", "list", env=_env(AUTH_LOG_FORMAT="text", **case))
        assert result.returncode == 2, result.stderr
        message = _failure(result, "text")
        assert "AUTH_DATABASE_URL" in message or "AUTH_DATA_DIR" in message, message
        assert password not in result.stderr and "Traceback" not in result.stderr
    # `serve` too, which first makes the KEK file there (outside-in review: exit 70 and a
    # traceback from its mkdir).
    for case in cases[2:]:
        env = _env(AUTH_LOG_FORMAT="text", AUTH_LISTEN="127.0.0.1:0", **case)
        result = _authsvc("serve", env=env)
        assert result.returncode == 2, result.stderr
        assert "AUTH_DATA_DIR" in _failure(result, "text")


@pytest.mark.system
def test_a_bad_setting_is_one_json_line_when_json_is_asked_for() -> None:
    result = _authsvc("serve", env=_env(AUTH_LOG_FORMAT="json", AUTH_ACCESS_TTL="soon"))
    assert result.returncode == 2
    assert _failure(result, "json").startswith("AUTH_ACCESS_TTL:")


@pytest.mark.system
def test_a_port_in_use_is_one_line(database_url: str, tmp_path: Path) -> None:
    env = _server_env(database_url, tmp_path, AUTH_KEK=_b64(TEST_KEK))
    with _serving(env) as (port, _):
        for workers in ("1", "2"):
            taken = {**env, "AUTH_LISTEN": f"127.0.0.1:{port}", "AUTH_WORKERS": workers}
            result = _authsvc("serve", env=taken)
            assert result.returncode == 2, result.stderr
            assert f"127.0.0.1:{port}" in _failure(result, "text")
        # Before any database work (outside-in review: a refused server first migrated and
        # wrote key material and settings): with no database to reach, still the port's line.
        unreachable = {**taken, "AUTH_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
        result = _authsvc("serve", env=unreachable)
        assert result.returncode == 2, result.stderr
        assert f"127.0.0.1:{port}" in _failure(result, "text")
        # The metrics port as well.
        metrics_taken = {
            **unreachable,
            "AUTH_LISTEN": "127.0.0.1:0",
            "AUTH_METRICS_LISTEN": f"127.0.0.1:{port}",
        }
        result = _authsvc("serve", env=metrics_taken)
        assert result.returncode == 2, result.stderr
        assert _failure(result, "text").startswith("authsvc: AUTH_METRICS_LISTEN:")


@pytest.mark.system
def test_a_pool_the_database_cannot_hold_is_refused_at_start(
    database_url: str, tmp_path: Path
) -> None:
    """AUTH_DB_POOL_SIZE x workers (+ a listener each) over the database's connections:
    refused in one line at start, not UNAVAILABLE under load with the cause nowhere in the
    log (the test database takes 100)."""
    for workers in ("1", "2"):
        env = _server_env(database_url, tmp_path, AUTH_DB_POOL_SIZE="120", AUTH_WORKERS=workers)
        result = _authsvc("serve", env=env)
        assert result.returncode == 2, result.stderr
        message = _failure(result, "text")
        assert "AUTH_DB_POOL_SIZE=120" in message and "max_connections" in message
    # What fits still starts: 2 workers x (40 + 1).
    with _serving(_server_env(database_url, tmp_path, AUTH_DB_POOL_SIZE="40", AUTH_WORKERS="2")):
        pass


# Item 6: an old binary refuses a newer schema.


@pytest.mark.system
async def test_a_schema_newer_than_the_binary_is_refused_naming_both_versions(
    database_url: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            LATEST + 1,
            f"{LATEST + 1:04d}_from_the_future.sql",
        )
    finally:
        await conn.close()
    env = _server_env(database_url, tmp_path, AUTH_KEK=_b64(TEST_KEK))
    for args in (("migrate",), ("serve",), ("serve", "--workers", "1"), ("users", "list")):
        result = _authsvc(*args, env=env)
        assert result.returncode == 4, (args, result.stderr)
        line = _failure(result, "text")
        assert f"version {LATEST + 1}" in line and f"version {LATEST}" in line, line
    assert await _key_material_rows(database_url) == (0, 0)


@pytest.mark.system
async def test_commands_other_than_migrate_and_serve_refuse_an_old_schema(
    empty_database: str, tmp_path: Path
) -> None:
    """A user command must not migrate a database under running servers by the way."""
    env = _server_env(empty_database, tmp_path, AUTH_KEK=_b64(TEST_KEK))
    result = _authsvc("users", "list", env=env)
    assert result.returncode == 4, result.stderr
    assert "authsvc migrate" in _failure(result, "text")
    migrated = _authsvc("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert _authsvc("users", "list", env=env).returncode == 0


# Item 7: migrations have their own timeouts and wait for the lock.


@pytest.mark.system
async def test_migrate_waits_for_the_migration_lock_with_a_progress_line(
    empty_database: str, tmp_path: Path
) -> None:
    env = _server_env(empty_database, tmp_path, AUTH_DB_TIMEOUT="1")
    holder = await asyncpg.connect(empty_database)
    proc = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        holder_pid = holder.get_server_pid()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert "waiting for the migration lock" in line and f"pid {holder_pid}" in line
            # Well past AUTH_DB_TIMEOUT, it is still waiting.
            await asyncio.sleep(2.5)
            assert proc.returncode is None
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "0001_initial.sql" in out.decode()
    finally:
        await holder.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.system
async def test_migrate_gives_up_on_the_lock_after_auth_migration_timeout(
    empty_database: str, tmp_path: Path
) -> None:
    env = _server_env(empty_database, tmp_path, AUTH_MIGRATION_TIMEOUT="2")
    holder = await asyncpg.connect(empty_database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        started = time.monotonic()
        result = await asyncio.to_thread(_authsvc, "migrate", env=env)
        assert time.monotonic() - started >= 2
    finally:
        await holder.close()
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "waiting for the migration lock" in lines[0]
    assert "AUTH_MIGRATION_TIMEOUT" in lines[-1] and lines[-1].startswith("authsvc: ")


@pytest.mark.system
async def test_a_migration_may_wait_longer_than_auth_db_timeout(
    empty_database: str, tmp_path: Path
) -> None:
    """A migration statement blocked (here by another session's table lock; in life by a
    large table) runs under AUTH_MIGRATION_TIMEOUT, not the per-call AUTH_DB_TIMEOUT."""
    migrations = load_migrations()
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations[:-1]:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        # Every table the last migration may touch, held for longer than AUTH_DB_TIMEOUT.
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'"
        )
        env = _server_env(empty_database, tmp_path, AUTH_DB_TIMEOUT="1")
        async with conn.transaction():
            for row in tables:
                await conn.execute(f'LOCK TABLE "{row["tablename"]}" IN ACCESS EXCLUSIVE MODE')
            running = asyncio.create_task(asyncio.to_thread(_authsvc, "migrate", env=env))
            await asyncio.sleep(3)
        result = await running
    finally:
        await conn.close()
    assert result.returncode == 0, result.stderr
    assert migrations[-1].name in result.stdout


def test_migration_timeout_setting_is_parsed_strictly() -> None:
    from service.settings import Settings, SettingsError

    assert Settings.from_env({}).migration_timeout == 600
    assert Settings.from_env({"AUTH_MIGRATION_TIMEOUT": "0"}).migration_timeout == 0
    with pytest.raises(SettingsError, match=r"^AUTH_MIGRATION_TIMEOUT:"):
        Settings.from_env({"AUTH_MIGRATION_TIMEOUT": "-1"})


def test_an_unexpected_error_keeps_its_traceback_after_the_line() -> None:
    """A bug is not a configuration problem: exit 70, the one line, then the traceback
    (inside the one JSON object when JSON is asked for)."""
    from service.errors import DatabaseUnavailable, UserNotFound
    from service.failures import describe
    from service.logs import failure_line

    assert describe(DatabaseUnavailable())[0] == 3
    assert describe(UserNotFound())[:2] == (1, UserNotFound.message)
    try:
        raise KeyError("boom")
    except KeyError as exc:
        code, message, unexpected = describe(exc)
        trace = traceback.format_exc()
    assert (code, unexpected) == (70, True)
    assert "KeyError" in message and "\n" not in message
    text = failure_line(message, log_format="text", exit_code=code, traceback=trace)
    assert text.startswith(f"authsvc: {message}\nTraceback")
    (line,) = failure_line(message, log_format="json", exit_code=code, traceback=trace).split("\n")
    record = json.loads(line)
    assert record["exit_code"] == 70 and "Traceback" in record["exception"]
