"""Settings every replica on one database must share (issue 14, item 5): the first `serve`
records them, every later one compares and refuses to start on a mismatch, and
`authsvc settings adopt` is the one (logged) way to change them for all."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import asyncpg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.domain.shared_settings import shown
from service.failures import EXIT_CONFIGURATION, StartupError
from service.settings import Settings
from tests.helpers import validate
from tests.live_server import TEST_KEK, LiveServer, ServerFactory
from tests.test_cli import _authsvc, _server_env, _serving

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _recorded(database_url: str) -> dict[str, object]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT name, value FROM shared_settings")
    finally:
        await conn.close()
    return {r["name"]: json.loads(r["value"]) for r in rows}


async def _events(database_url: str, kind: str) -> list[dict[str, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT detail FROM security_events WHERE kind = $1 ORDER BY id", kind
        )
    finally:
        await conn.close()
    return [json.loads(r["detail"]) for r in rows]


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def _health(server: LiveServer, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_the_first_server_records_the_settings_replicas_must_share(
    server_factory: ServerFactory, database_url: str
) -> None:
    await server_factory(issuer="https://auth.example", access_ttl=600)
    recorded = await _recorded(database_url)
    assert recorded["issuer"] == "https://auth.example"
    assert recorded["access_ttl"] == 600
    assert recorded["signing_alg"] == "ES256"
    # Per-process settings are not among them, and neither is any secret.
    assert not {"db_pool_size", "listen", "kek", "database_url"} & recorded.keys()
    [event] = await _events(database_url, "shared_settings_recorded")
    assert event["AUTH_ISSUER"] == '"https://auth.example"'


async def test_a_replica_with_another_issuer_refuses_to_start_naming_both_values(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory(issuer="https://auth.example")
    with pytest.raises(StartupError) as refused:
        await server_factory(issuer="https://other.example")
    message = str(refused.value)
    assert refused.value.exit_code == EXIT_CONFIGURATION
    assert "\n" not in message
    assert "AUTH_ISSUER" in message
    assert "https://auth.example" in message and "https://other.example" in message
    assert "authsvc settings adopt" in message
    # The first one is untouched.
    assert await _health(first, "authsvc.settings") == SERVING


async def test_a_replica_with_another_signing_algorithm_refuses_to_start(
    server_factory: ServerFactory,
) -> None:
    await server_factory()
    with pytest.raises(StartupError) as refused:
        await server_factory(signing_alg="EdDSA", refresh_reuse_grace=0)
    message = str(refused.value)
    assert "AUTH_SIGNING_ALG" in message and "ES256" in message and "EdDSA" in message
    # Every differing setting is named, and only those.
    assert "AUTH_REFRESH_REUSE_GRACE" in message
    assert "AUTH_ISSUER" not in message


async def test_of_two_replicas_starting_together_with_other_issuers_one_starts(
    server_factory: ServerFactory, database_url: str
) -> None:
    """The first start's record is made under the bootstrap lock: never a mix of both."""
    results = await asyncio.gather(
        server_factory(issuer="https://a.example", access_ttl=600),
        server_factory(issuer="https://b.example", access_ttl=700),
        return_exceptions=True,
    )
    started = [r for r in results if isinstance(r, LiveServer)]
    refused = [r for r in results if isinstance(r, StartupError)]
    assert len(started) == 1 and len(refused) == 1, results
    recorded = await _recorded(database_url)
    assert (recorded["issuer"], recorded["access_ttl"]) == (
        started[0].settings.issuer,
        started[0].settings.access_ttl,
    )
    assert "AUTH_ISSUER" in str(refused[0]) and "AUTH_ACCESS_TTL" in str(refused[0])


async def test_per_process_settings_may_differ_between_replicas(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory()
    user = await first.create_user()
    pair = await first.login(user.username)
    second = await server_factory(
        db_pool_size=3, token_cache_size=0, max_concurrent_rpcs=10, janitor_interval=5.0
    )
    assert (await validate(second, pair.access_token)).valid


async def test_a_shared_setting_not_recorded_yet_is_recorded_not_refused(
    server_factory: ServerFactory, database_url: str
) -> None:
    """What a database recorded by an older release (which knew fewer shared settings)
    looks like to the release that adds one: recorded by its first start, not refused."""
    await server_factory()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM shared_settings WHERE name = 'leeway'")
        # ... and a name this release does not know (written by a newer one) is ignored.
        await conn.execute(
            "INSERT INTO shared_settings (name, value, recorded_at) "
            "VALUES ('from_the_future', '1', now())"
        )
    finally:
        await conn.close()
    await server_factory(leeway=7)
    assert (await _recorded(database_url))["leeway"] == 7
    with pytest.raises(StartupError, match="AUTH_LEEWAY"):
        await server_factory(leeway=0)


@pytest.mark.system
def test_serve_with_another_issuer_refuses_in_one_line_with_exit_code_2(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(database_url, tmp_path, AUTH_ISSUER="https://auth.example")
    with _serving(env):
        for workers in ("1", "2"):
            other = {**env, "AUTH_ISSUER": "https://other.example", "AUTH_WORKERS": workers}
            result = _authsvc("serve", env=other)
            assert result.returncode == 2, result.stderr
            line = _one_line(result)
            assert line.startswith("authsvc: ")
            assert "AUTH_ISSUER" in line
            assert "https://auth.example" in line and "https://other.example" in line
            assert base64.b64encode(TEST_KEK).decode() not in result.stderr
        # The same settings start beside it (a pool of another size too).
        with _serving({**env, "AUTH_DB_POOL_SIZE": "3"}):
            pass


@pytest.mark.system
async def test_settings_adopt_changes_them_for_every_replica_and_is_recorded(
    server_factory: ServerFactory, database_url: str, tmp_path: Path
) -> None:
    old = await server_factory(issuer="https://auth.example")
    env = _server_env(database_url, tmp_path, AUTH_ISSUER="https://new.example")

    shown = _authsvc("settings", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    [issuer_line] = [line for line in shown.stdout.splitlines() if "AUTH_ISSUER" in line]
    assert "https://auth.example" in issuer_line and "https://new.example" in issuer_line
    assert "differs" in issuer_line

    adopted = _authsvc("settings", "adopt", env=env)
    assert adopted.returncode == 0, adopted.stderr
    assert "AUTH_ISSUER" in adopted.stdout
    assert "https://auth.example" in adopted.stderr and "https://new.example" in adopted.stderr
    assert (await _recorded(database_url))["issuer"] == "https://new.example"
    [event] = await _events(database_url, "shared_settings_adopted")
    assert event["AUTH_ISSUER"] == '"https://auth.example" -> "https://new.example"'
    assert event["actor"] == "cli"
    assert "AUTH_SIGNING_ALG" not in event  # unchanged settings are not listed

    # New replicas start with the new value; the old value is refused from now on.
    new = await server_factory(issuer="https://new.example")
    with pytest.raises(StartupError, match="AUTH_ISSUER"):
        await server_factory(issuer="https://auth.example")
    # The old replica keeps serving (a rolling change must not drain it before its
    # replacement is up), but says on its next check that it no longer agrees.
    assert await old.running.settings_watch.check() is False
    assert await _health(old, "authsvc.settings") == NOT_SERVING
    assert await _health(old, "") == SERVING
    assert await _health(new, "authsvc.settings") == SERVING

    again = _authsvc("settings", "adopt", env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to adopt" in again.stdout
    assert len(await _events(database_url, "shared_settings_adopted")) == 1


async def test_the_warning_of_a_replica_left_behind_is_logged_once(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from service.domain.shared_settings import adopt_shared_settings

    old = await server_factory(issuer="https://auth.example")
    await adopt_shared_settings(
        old.running.components.store,
        replace(old.settings, issuer="https://new.example"),
        clock=old.clock,
        actor="test",
    )
    caplog.clear()
    for _ in range(3):
        assert await old.running.settings_watch.check() is False
    warnings = [r.getMessage() for r in caplog.records if "no longer" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "AUTH_ISSUER" in warnings[0] and "https://new.example" in warnings[0]


@pytest.mark.system
def test_one_shot_commands_record_nothing_and_key_commands_refuse_a_mismatch(
    database_url: str, tmp_path: Path
) -> None:
    env = _server_env(database_url, tmp_path)
    for args in (("users", "list"), ("keys", "list"), ("events",), ("settings", "show")):
        result = _authsvc(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
    assert _authsvc_rows(database_url) == 0
    with _serving(env):
        pass
    assert _authsvc_rows(database_url) > 0
    # A key made, or keys retired, with this command's own algorithm or lifetimes would
    # act on every replica: with settings that are not the shared ones they refuse.
    for args, variable, value in (
        (("keys", "rotate"), "AUTH_SIGNING_ALG", "RS256"),
        (("keys", "retire"), "AUTH_ACCESS_TTL", "60"),
    ):
        result = _authsvc(*args, env={**env, variable: value})
        assert result.returncode == 2, result.stderr
        assert variable in _one_line(result)
    assert _authsvc("keys", "rotate", env=env).returncode == 0


def _authsvc_rows(database_url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM shared_settings"))
        finally:
            await conn.close()

    return asyncio.run(count())


def test_the_shared_settings_are_settings_fields_and_hold_no_secret() -> None:
    from service.domain.shared_settings import SHARED_SETTINGS

    names = {f.name for f in fields(Settings)}
    assert set(SHARED_SETTINGS) <= names
    assert len(set(SHARED_SETTINGS)) == len(SHARED_SETTINGS)
    assert not {"kek", "database_url", "tls_key", "service_tokens_file"} & set(SHARED_SETTINGS)


def test_each_shared_setting_is_named_by_the_variable_that_sets_it() -> None:
    """The error line and the events name `variable_name(field)`: it must be the very
    variable `Settings.from_env` reads for that field."""
    from service.domain.shared_settings import SHARED_SETTINGS, shared_values, variable_name

    defaults = shared_values(Settings.from_env({}))
    for name in SHARED_SETTINGS:
        default = defaults[name]
        if isinstance(default, bool):
            raw = "off" if default else "on"
        elif isinstance(default, int):
            raw = str(default + 60)  # within every bound (0 or 60 s and more for rotation)
        elif name == "signing_alg":
            raw = "EdDSA"
        else:
            raw = "changed"
        changed = shared_values(Settings.from_env({variable_name(name): raw}))
        assert changed[name] != default, name
        assert {n for n in defaults if changed[n] != defaults[n]} == {name}


def test_a_switch_is_shown_as_its_variable_is_spelled() -> None:
    """Switches are set as on/off (the strict grammar refuses true/false): the log lines
    and refusals about shared settings say them the same way."""
    assert (shown(True), shown(False)) == ("on", "off")
    assert shown("https://auth.example") == '"https://auth.example"'
