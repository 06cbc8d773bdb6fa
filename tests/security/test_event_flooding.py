"""Cheap requests repeated at will must not grow the security-event table or the logs at
will: repeated events with one source and key share one row (a count, first and last
time) per aggregation window, and their log lines are rate-limited with a count of what
was suppressed. Grace-window replays are recorded and counted, retries told from
suspicious ones."""

from __future__ import annotations

import logging
import uuid

import asyncpg
import grpc
import pytest
from prometheus_client import CollectorRegistry

from service.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import PASSWORD, LiveServer, ServerFactory
from tests.helpers import assert_error, refresh, refresh_fails

WRONG = "not the password"
FLOOD = 40


async def _issue_error(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, username: str, password: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username=username, password=password)
            )
        )
    return caught.value


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def _events(server: LiveServer, kind: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await server.pool.fetch(
        "SELECT * FROM security_events WHERE kind = $1 ORDER BY id", kind
    )
    return rows


def _counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_throttled_address_flooding_issue_leaves_one_counted_row_and_one_log_line(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await server_factory(throttle_user_failures=100, throttle_peer_failures=0)
    # The first failure makes the address wait; everything after it is refused unchecked.
    assert_error(
        await _issue_error(server.stub, "mallory", WRONG),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    # New connections (new source ports) and new 256-byte usernames on every call.
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
    try:
        for n in range(FLOOD):
            stub: auth_pb2_grpc.AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(
                channels[n % len(channels)]
            )
            username = f"{n:03d}" + "x" * 253
            assert_error(
                await _issue_error(stub, username, WRONG),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "LOGIN_THROTTLED",
            )
    finally:
        for channel in channels:
            await channel.close()

    rows = await _events(server, "login_throttled")
    assert len(rows) == 1
    assert rows[0]["occurrences"] == FLOOD
    assert rows[0]["occurred_at"].timestamp() == server.clock.now()
    assert rows[0]["last_occurred_at"].timestamp() == server.clock.now()
    # The stored username is cut short: the attacker chooses it.
    assert len(str(rows[0]["detail"])) < 200
    assert len(_warnings(caplog, "login throttled")) == 1

    # A window later: a new row, and the next log line says how many were left out.
    server.clock.advance(server.settings.event_aggregation_window + 1)
    await _issue_error(server.stub, "mallory", WRONG)  # the wait is over: locks again
    await _issue_error(server.stub, "mallory", WRONG)
    rows = await _events(server, "login_throttled")
    assert [r["occurrences"] for r in rows] == [FLOOD, 1]
    lines = _warnings(caplog, "login throttled")
    assert len(lines) == 2
    assert f"{FLOOD - 1} more suppressed" in lines[1]


async def test_repeated_failed_logins_of_one_address_and_username_share_a_row(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(login_throttle=False)
    for _ in range(5):
        await _issue_error(server.stub, "ghost", WRONG)
    await _issue_error(server.stub, "other-ghost", WRONG)
    rows = await _events(server, "login_failed")
    assert len(rows) == 2
    assert sorted(r["occurrences"] for r in rows) == [1, 5]


async def test_replaying_a_rotated_token_of_a_dead_family_leaves_one_counted_row(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    await server.create_user("mallory")
    first = await server.login("mallory")
    await refresh(server, first.refresh_token)
    server.clock.advance(server.settings.refresh_reuse_grace + 1)
    # The first replay revokes the live family: always its own row and log line.
    await refresh_fails(server, first.refresh_token, "REFRESH_TOKEN_REUSED")
    for _ in range(FLOOD):
        await refresh_fails(server, first.refresh_token, "REFRESH_TOKEN_REUSED")

    rows = await _events(server, "refresh_token_reused")
    assert len(rows) == 2
    assert [(r["occurrences"], r["detail"]) for r in rows] == [
        (1, "{}"),
        (FLOOD, '{"unchanged": "true"}'),
    ]
    assert all(r["session_id"] == uuid.UUID(first.session_id) for r in rows)
    assert len(_warnings(caplog, "refresh token reuse")) == 2

    # Another family's reuse in the same window revokes it and is recorded on its own.
    second = await server.login("mallory")
    await refresh(server, second.refresh_token)
    server.clock.advance(server.settings.refresh_reuse_grace + 1)
    await refresh_fails(server, second.refresh_token, "REFRESH_TOKEN_REUSED")
    rows = await _events(server, "refresh_token_reused")
    assert [r["occurrences"] for r in rows] == [1, FLOOD, 1]
    assert rows[2]["session_id"] == uuid.UUID(second.session_id)


async def test_grace_replays_are_recorded_counted_and_told_apart(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # "localhost" binds 127.0.0.1 and ::1 alike: two addresses for one client machine.
    server = await server_factory(listen="localhost:0", metrics_listen="127.0.0.1:0")
    assert server.running.telemetry is not None
    registry = server.running.telemetry.registry
    await server.create_user("owner")
    pair = await server.login("owner")
    child = await refresh(server, pair.refresh_token)

    # A retry: the same address, within a second of the rotation (a lost response).
    for _ in range(3):
        assert (await refresh(server, pair.refresh_token)).refresh_token == child.refresh_token
    # Later in the window: the same child, but suspicious.
    server.clock.advance(2)
    assert (await refresh(server, pair.refresh_token)).refresh_token == child.refresh_token

    rows = await _events(server, "refresh_token_replayed")
    assert len(rows) == 2
    assert [(r["occurrences"], r["detail"]) for r in rows] == [
        (3, '{"verdict": "retry"}'),
        (1, '{"reason": "late", "verdict": "suspicious"}'),
    ]
    assert all(r["session_id"] == uuid.UUID(pair.session_id) for r in rows)
    assert _counter(registry, "authsvc_refresh_replays_total", verdict="retry") == 3
    assert _counter(registry, "authsvc_refresh_replays_total", verdict="suspicious") == 1
    assert len(_warnings(caplog, "replayed")) == 1

    # A thief racing the owner from another address, within the second: suspicious.
    other = await server.login("owner")
    await refresh(server, other.refresh_token)
    async with grpc.aio.insecure_channel(f"[::1]:{server.running.port}") as channel:
        thief = auth_pb2_grpc.AuthServiceStub(channel)
        for _ in range(FLOOD):
            await thief.Refresh(auth_pb2.RefreshRequest(refresh_token=other.refresh_token))
    rows = await _events(server, "refresh_token_replayed")
    assert len(rows) == 3
    assert rows[2]["session_id"] == uuid.UUID(other.session_id)
    assert rows[2]["occurrences"] == FLOOD
    assert rows[2]["detail"] == '{"reason": "different_peer", "verdict": "suspicious"}'
    assert "::1" in str(rows[2]["peer"])
    assert _counter(registry, "authsvc_refresh_replays_total", verdict="suspicious") == 1 + FLOOD
    # One line per session and window, however many replays.
    assert len(_warnings(caplog, "replayed")) == 2
    assert PASSWORD not in caplog.text
