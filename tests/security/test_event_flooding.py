"""Cheap requests repeated at will must not grow the security-event table or the logs at
will: repeated events with one source and key share one row (a count, first and last
time) per aggregation window, and their log lines are rate-limited with a count of what
was suppressed. Grace-window replays are recorded and counted, retries told from
suspicious ones."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client import CollectorRegistry

from service.clock import ManualClock
from service.domain.events import (
    MAX_STORED_TEXT,
    LogRateLimiter,
    aggregate_key,
    capped,
    peer_address,
)
from service.domain.records import RefreshTokenState
from service.domain.refresh_tokens import replay_verdict
from tests.helpers import assert_error, refresh, refresh_fails
from tests.live_server import PASSWORD, LiveServer, ServerFactory

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
    # Several connections (source ports), a new 256-byte username on every call, all at
    # once: the count is added up in one statement, so concurrent calls lose none.
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
    try:

        async def throttled(n: int) -> None:
            stub: auth_pb2_grpc.AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(
                channels[n % len(channels)]
            )
            assert_error(
                await _issue_error(stub, f"{n:03d}" + "x" * 253, WRONG),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "LOGIN_THROTTLED",
            )

        await asyncio.gather(*(throttled(n) for n in range(FLOOD)))
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
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await server_factory(metrics_listen="127.0.0.1:0")
    assert server.running.telemetry is not None
    registry = server.running.telemetry.registry
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
    # Every replay is detected, but only the first revoked a session.
    assert _counter(registry, "authsvc_refresh_reuse_detected_total") == 1 + FLOOD
    assert _counter(registry, "authsvc_sessions_revoked_total", target="reuse") == 1

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
    assert [(r["occurrences"], json.loads(r["detail"])) for r in rows] == [
        (3, {"verdict": "retry"}),
        (1, {"verdict": "suspicious", "reason": "late", "rotated_by": "ipv4:127.0.0.1"}),
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
    assert json.loads(rows[2]["detail"]) == {
        "verdict": "suspicious",
        "reason": "different_peer",
        "rotated_by": "ipv4:127.0.0.1",
    }
    assert "::1" in str(rows[2]["peer"])
    assert _counter(registry, "authsvc_refresh_replays_total", verdict="suspicious") == 1 + FLOOD
    # One line per session and window, however many replays.
    assert len(_warnings(caplog, "replayed")) == 2
    assert PASSWORD not in caplog.text


# The pure parts


def test_replay_verdicts() -> None:
    rotated_at = datetime(2030, 1, 1, tzinfo=UTC)
    state = RefreshTokenState(
        token_hash=b"\0" * 32,
        session_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        issued_at=rotated_at,
        expires_at=rotated_at + timedelta(days=1),
        used_at=rotated_at,
        child_hash=b"\1" * 32,
        child_expires_at=rotated_at + timedelta(days=1),
        child_used=False,
        session_scopes=(),
        session_audience="a",
        session_expires_at=rotated_at + timedelta(days=2),
        session_revoked=False,
        user_scopes=(),
        user_disabled=False,
        rotated_by_peer="ipv4:10.0.0.1:5000",
    )
    second = timedelta(seconds=1)
    # Another connection (port) of the same address, within the second: a retry.
    assert replay_verdict(state, now=rotated_at + second, peer="ipv4:10.0.0.1:6000") == (
        "retry",
        None,
    )
    assert replay_verdict(
        state, now=rotated_at + second + timedelta(microseconds=1), peer="ipv4:10.0.0.1:5000"
    ) == ("suspicious", "late")
    assert replay_verdict(state, now=rotated_at, peer="ipv4:10.0.0.2:5000") == (
        "suspicious",
        "different_peer",
    )
    assert replay_verdict(state, now=rotated_at + 5 * second, peer=None) == (
        "suspicious",
        "different_peer,late",
    )
    # Rotated before the rotating address was recorded: not known to be the same.
    unknown = replace(state, rotated_by_peer=None)
    assert replay_verdict(unknown, now=rotated_at, peer="ipv4:10.0.0.1:5000")[0] == "suspicious"


def test_stored_client_text_is_capped() -> None:
    assert capped("alice") == "alice"
    assert capped("x" * MAX_STORED_TEXT) == "x" * MAX_STORED_TEXT
    cut = capped("y" * 256)
    assert len(cut) == MAX_STORED_TEXT
    assert cut.endswith("…")


def test_peer_addresses_drop_the_port() -> None:
    assert peer_address("ipv4:127.0.0.1:5000") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:5000") == "ipv6:::/64"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"
    assert peer_address(None) == "-"


def test_one_ipv6_subscriber_is_one_source_of_events_however_many_addresses_it_uses() -> None:
    """A client picks any address of its /64 for each call: its failed logins, replays and
    refusals must still share one aggregated row and one log line per window (as they
    share one throttle key and one stream budget), not get a fresh one per address."""
    sources = {peer_address(f"ipv6:[2001:db8:1:2:{n:x}::1]:{40000 + n}") for n in range(1, 200)} | {
        peer_address("ipv6:%5B2001:db8:1:2::9%5D:1")
    }
    assert sources == {"ipv6:2001:db8:1:2::/64"}
    assert len({aggregate_key(s, "alice") for s in sources}) == 1
    # IPv4 over IPv6 (IPv4-mapped) is the IPv4 address; another /64 is another source.
    assert peer_address("ipv6:[::ffff:192.0.2.7]:5000") == peer_address("ipv4:192.0.2.7:6000")
    assert peer_address("ipv6:[2001:db8:1:3::1]:1") != peer_address("ipv6:[2001:db8:1:2::1]:1")


def test_aggregate_keys_do_not_merge_different_parts() -> None:
    assert aggregate_key("a|b", "c") != aggregate_key("a", "b|c")
    assert aggregate_key("x" * 300 + "1") != aggregate_key("x" * 300 + "2")
    assert len(aggregate_key("x" * 10_000)) == 64


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _limiter(max_keys: int = 3) -> tuple[LogRateLimiter, _Lines, ManualClock]:
    logger = logging.getLogger(f"test.limiter.{uuid.uuid4().hex}")
    logger.propagate = False
    lines = _Lines()
    logger.addHandler(lines)
    clock = ManualClock(start=1000.0)
    return LogRateLimiter(logger, window=60, now=clock.now, max_keys=max_keys), lines, clock


def test_log_lines_are_limited_per_key_and_report_what_they_left_out() -> None:
    limiter, lines, clock = _limiter()
    for _ in range(5):
        limiter.warning(("kind", "a"), "event from %s", "a")
    limiter.warning(("kind", "b"), "event from %s", "b")
    assert lines.lines == ["event from a", "event from b"]
    clock.advance(59)
    limiter.warning(("kind", "a"), "event from %s", "a")
    assert len(lines.lines) == 2
    clock.advance(1)
    limiter.warning(("kind", "a"), "event from %s", "a")
    assert lines.lines[2] == "event from a (5 more suppressed)"


def test_log_limiter_memory_is_bounded_and_overflow_shares_one_line() -> None:
    limiter, lines, clock = _limiter(max_keys=3)
    for source in range(100):
        limiter.warning(("kind", str(source)), "event from %s", source)
    # Three keys of their own, then every new source shares one line per window.
    assert lines.lines == ["event from 0", "event from 1", "event from 2", "event from 3"]
    assert len(limiter._windows) <= 3 + 1  # its keys and the shared one: bounded
    # Once their windows end, keys are forgotten with one line for what they held back.
    clock.advance(60)
    limiter.warning(("kind", "new"), "event from %s", "new")
    assert lines.lines[4:] == [
        "security: 96 more warnings suppressed (1 sources)",
        "event from new",
    ]
