"""Replicas whose own clocks disagree still agree on the time: every decision uses the
database's clock (`DatabaseClock`), and each replica checks its host's clock against it.

A "replica" here is a real server on its own pool, all on one database, whose host wall
clock is off by `skew` seconds (a `Timeline` stands in for the real clocks, so that a test
can also jump forward in time). On the old wiring each replica ran on its wall clock.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import jwt
import pytest
from authsvc_client.gen.auth.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.clock import (
    ClockReading,
    ClockSkewTooLarge,
    DatabaseClock,
    ManualClock,
    estimate_offset,
    judge_skew,
    keep_measuring,
)
from service.components import start_database_clock
from service.database import create_pool
from service.domain.access_tokens import START_LEEWAY_SECONDS
from service.domain.signing_keys import KEY_ACTIVATION_DELAY
from service.server import start_server
from service.settings import Settings, SettingsError
from tests.helpers import refresh, validate
from tests.live_server import LiveServer, SecretsSeen, _RecordSecrets, stop_live_server
from tests.test_cli import _server_env


class Timeline(ManualClock):
    """The real time, plus whatever the test jumped forward: `monotonic()` stands in for
    every replica's monotonic clock and `wall(skew)` for a host's wall clock."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self._jumped = 0.0

    def now(self) -> float:
        return time.time() + self._jumped

    def advance(self, seconds: float) -> None:
        self._jumped += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self._jumped

    def wall(self, skew: float) -> Callable[[], float]:
        return lambda: time.time() + self._jumped + skew


class Replicas:
    """Starts replicas on the test's database, each with its host clock off by `skew`."""

    def __init__(self, settings: Settings, secrets_seen: SecretsSeen) -> None:
        self.settings = settings
        self.timeline = Timeline()
        self._secrets_seen = secrets_seen
        self.started: list[LiveServer] = []

    async def start(self, skew: float, **overrides: object) -> LiveServer:
        settings = replace(self.settings, **overrides)  # type: ignore[arg-type]
        assert settings.database_url is not None
        pool = await create_pool(settings.database_url, settings)
        try:
            clock = await start_database_clock(
                settings, pool, wall=self.timeline.wall(skew), monotonic=self.timeline.monotonic
            )
            running = await start_server(
                settings, dsn=settings.database_url, pool=pool, clock=clock
            )
        except BaseException:
            await pool.close()
            raise
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{running.port}", interceptors=[_RecordSecrets(self._secrets_seen)]
        )
        live = LiveServer(
            running=running,
            channel=channel,
            stub=auth_pb2_grpc.AuthServiceStub(channel),
            pool=pool,
            clock=self.timeline,
            settings=settings,
        )
        self.started.append(live)
        return live


@pytest.fixture
async def replicas(settings: Settings, secrets_seen: SecretsSeen) -> AsyncIterator[Replicas]:
    made = Replicas(settings, secrets_seen)
    yield made
    for live in made.started:
        await stop_live_server(live)


async def eventually(check: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- replicas with skewed clocks ---


async def test_a_refresh_retried_on_a_correct_replica_after_a_slow_one_gets_the_same_child(
    replicas: Replicas,
) -> None:
    """A Refresh on a replica 15 s slow, then the client's retry of the same token on a
    correct replica within the grace window (10 s): the same child, no reuse verdict."""
    slow = await replicas.start(skew=-15.0)
    correct = await replicas.start(skew=0.0)
    user = await correct.create_user()
    pair = await correct.login(user.username)

    first = await refresh(slow, pair.refresh_token)
    retried = await refresh(correct, pair.refresh_token)

    assert retried.refresh_token == first.refresh_token
    assert (await validate(correct, retried.access_token)).valid


@pytest.mark.parametrize("skew", [2.0, 15.0])
async def test_a_token_from_a_replica_whose_clock_is_fast_validates_on_the_others(
    replicas: Replicas, skew: float
) -> None:
    """2 s: the issue's case; 15 s: beyond the iat leeway, so only the shared clock helps."""
    fast = await replicas.start(skew=skew)
    correct = await replicas.start(skew=0.0)
    user = await fast.create_user()
    pair = await fast.login(user.username)

    answer = await validate(correct, pair.access_token)

    assert answer.valid, auth_pb2.ValidationError.Name(answer.error)
    # Its lifetime is the database's time too: exp is iat + access_ttl from now, not later.
    assert pair.access_token_expires_at.seconds <= time.time() + correct.settings.access_ttl + 1


async def test_a_replica_with_a_slow_clock_signs_with_a_new_key_when_the_others_do(
    replicas: Replicas,
) -> None:
    """The key schedule is the database's time: a replica 15 s slow does not keep signing
    with the superseded key for 15 s after the new one became active."""
    correct = await replicas.start(skew=0.0)
    slow = await replicas.start(skew=-15.0)
    user = await correct.create_user()
    rotated = await admin_pb2_grpc.AdminServiceStub(correct.channel).RotateSigningKey(
        admin_pb2.RotateSigningKeyRequest()
    )
    new_kid = rotated.key.kid
    await eventually(lambda: new_kid in slow.running.components.signing_keys.ring.kids)

    replicas.timeline.advance(KEY_ACTIVATION_DELAY + 0.5)
    pair = await slow.login(user.username)

    assert jwt.get_unverified_header(pair.access_token)["kid"] == new_kid


async def test_the_shared_time_is_the_database_time_whatever_the_host_clocks_say(
    replicas: Replicas,
) -> None:
    slow = await replicas.start(skew=-15.0)
    fast = await replicas.start(skew=15.0)
    database_now = await slow.pool.fetchval("SELECT extract(epoch FROM clock_timestamp())")

    for live in (slow, fast):
        assert abs(live.running.components.clock.now() - float(database_now)) < 1.0


async def test_the_skew_metric_shows_how_far_the_host_clock_is_from_the_database(
    replicas: Replicas,
) -> None:
    fast = await replicas.start(skew=15.0, metrics_listen="127.0.0.1:0")
    telemetry = fast.running.telemetry
    assert telemetry is not None

    def skew() -> float | None:
        return telemetry.registry.get_sample_value("authsvc_clock_skew_seconds")

    await eventually(lambda: skew() is not None and skew() != 0.0)
    assert skew() == pytest.approx(15.0, abs=0.5)
    age = telemetry.registry.get_sample_value("authsvc_clock_measured_seconds_ago")
    assert age is not None and 0.0 <= age < fast.settings.clock_check_interval + 5


async def test_start_up_is_refused_past_the_maximum_skew_with_one_clear_line(
    replicas: Replicas,
) -> None:
    with pytest.raises(ClockSkewTooLarge) as refused:
        await replicas.start(skew=-45.0)  # default AUTH_CLOCK_SKEW_MAX: 30 s

    message = str(refused.value)
    assert "\n" not in message
    assert "45.0s behind the database's" in message
    assert "AUTH_CLOCK_SKEW_MAX=30s" in message
    assert replicas.started == []


# `authsvc serve` in a process whose wall clock (time.time) runs 45 s slow.
_SLOW_HOST_SERVE = """
import sys, time
real = time.time
time.time = lambda: real() - 45.0
from service.cli import main
sys.exit(main(["serve", "--workers", sys.argv[1]]))
"""


@pytest.mark.system
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_host_whose_clock_is_past_the_maximum_skew_exits_with_one_line(
    database_url: str, tmp_path: Path, workers: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SLOW_HOST_SERVE, workers],
        capture_output=True,
        text=True,
        env=_server_env(database_url, tmp_path),
        timeout=60,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    refusals = [line for line in done.stderr.splitlines() if line.startswith("authsvc: ")]
    assert len(refusals) == 1, done.stderr
    assert re.fullmatch(
        r"authsvc: this host's clock is 4[45]\.\ds behind the database's, more than "
        r"AUTH_CLOCK_SKEW_MAX=30s: .*",
        refusals[0],
    ), refusals[0]
    assert "Traceback" not in done.stderr
    assert "serving on" not in done.stdout


async def test_a_skew_past_the_warning_threshold_is_logged_at_start(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    await replicas.start(skew=3.0)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        re.search(r"clock is (2\.99|3\.00)\d*s ahead of the database's", w)
        and "AUTH_CLOCK_SKEW_WARN=1s" in w
        for w in warnings
    ), warnings


async def test_health_is_not_serving_while_the_host_clock_is_past_the_maximum_skew(
    replicas: Replicas,
) -> None:
    host_skew = [0.0]
    timeline = replicas.timeline
    settings = replace(replicas.settings, clock_check_interval=0.05)
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, settings)
    clock = await start_database_clock(
        settings,
        pool,
        wall=lambda: timeline.wall(host_skew[0])(),
        monotonic=timeline.monotonic,
    )
    running = await start_server(settings, dsn=settings.database_url, pool=pool, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    statuses: list[int] = []

    async def status() -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        return int(answer.status)

    async def wait_for(expected: int) -> None:
        deadline = time.monotonic() + 10
        while (current := await status()) != expected:
            assert time.monotonic() < deadline, current
            await asyncio.sleep(0.05)
        statuses.append(current)

    try:
        await wait_for(health_pb2.HealthCheckResponse.SERVING)
        host_skew[0] = 60.0
        await wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        host_skew[0] = 0.2
        await wait_for(health_pb2.HealthCheckResponse.SERVING)
    finally:
        await channel.close()
        await running.stop(None)
        await pool.close()
    assert len(statuses) == 3


# --- the leeway on iat and nbf ---


async def test_iat_a_few_seconds_ahead_is_accepted_with_no_leeway_configured(
    replicas: Replicas,
) -> None:
    """Settings leeway 0 (the default): a token stamped by a clock a little ahead (here:
    validated while time stands a few seconds earlier) is valid; far ahead is not."""
    assert replicas.settings.leeway == 0
    server = await replicas.start(skew=0.0)
    user = await server.create_user()
    pair = await server.login(user.username)

    replicas.timeline.advance(-(START_LEEWAY_SECONDS - 1))
    assert (await validate(server, pair.access_token)).valid
    later = await server.login(user.username)
    replicas.timeline.advance(-10.0)
    answer = await validate(server, later.access_token)
    assert answer.error == auth_pb2.VALIDATION_ERROR_NOT_YET_VALID


# --- the measurement, with a fake database ---


def reading(sent: float, received: float, database: float, wall: float) -> ClockReading:
    return ClockReading(sent=sent, received=received, database=database, wall=wall)


def test_the_offset_comes_from_the_reading_with_the_shortest_round_trip() -> None:
    readings = [
        reading(10.0, 10.5, 1000.4, 990.25),  # slow: 0.5 s round trip
        reading(20.0, 20.002, 1010.0015, 1000.001),  # 2 ms: the one to trust
        reading(30.0, 30.1, 1020.02, 1010.05),
    ]

    offset = estimate_offset(readings)

    assert offset.round_trip == pytest.approx(0.002)
    # database - midpoint of the round trip
    assert offset.monotonic_to_database == pytest.approx(1010.0015 - 20.001)
    assert offset.wall_skew == pytest.approx(1000.001 - 1010.0015)


def test_no_readings_is_an_error() -> None:
    with pytest.raises(ValueError, match="no clock readings"):
        estimate_offset([])


class FakeDatabase:
    """The database's clock at `ahead` seconds past the fake monotonic clock; `up` False
    makes a reading fail as a lost connection does."""

    def __init__(self, monotonic: ManualClock, ahead: float) -> None:
        self.monotonic = monotonic
        self.ahead = ahead
        self.up = True
        self.reads = 0

    async def readings(self) -> list[ClockReading]:
        self.reads += 1
        if not self.up:
            raise ConnectionResetError("database away")
        t = self.monotonic.now()
        return [reading(t, t + 0.004, t + 0.002 + self.ahead, t + 0.002)]


async def test_the_database_clock_runs_on_monotonic_time_between_measurements() -> None:
    monotonic = ManualClock(start=500.0)
    database = FakeDatabase(monotonic, ahead=1_900_000_000.0)
    clock = DatabaseClock(database.readings, monotonic=monotonic.now)

    await clock.measure()
    assert clock.now() == pytest.approx(1_900_000_500.0)
    monotonic.advance(30.0)
    assert clock.now() == pytest.approx(1_900_000_530.0)
    assert clock.wall_skew == pytest.approx(-1_900_000_000.0)
    assert clock.seconds_since_measured() == pytest.approx(30.0)


async def test_the_database_clock_refuses_to_tell_the_time_before_its_first_measurement() -> None:
    clock = DatabaseClock(FakeDatabase(ManualClock(start=0.0), ahead=0.0).readings)
    with pytest.raises(RuntimeError):
        clock.now()
    assert clock.wall_skew is None and clock.seconds_since_measured() is None


async def test_a_failed_measurement_keeps_the_last_offset_and_its_age_grows() -> None:
    monotonic = ManualClock(start=0.0)
    database = FakeDatabase(monotonic, ahead=1000.0)
    clock = DatabaseClock(database.readings, monotonic=monotonic.now)
    await clock.measure()
    database.up = False
    database.ahead = 5000.0  # what a working reading would have found

    monotonic.advance(60.0)
    with pytest.raises(ConnectionResetError):
        await clock.measure()

    assert clock.now() == pytest.approx(1060.0)
    assert clock.seconds_since_measured() == pytest.approx(60.0)
    database.up = True
    await clock.measure()
    assert clock.now() == pytest.approx(5060.0)
    assert clock.seconds_since_measured() == pytest.approx(0.0)


async def test_keep_measuring_survives_an_unreachable_database_and_flips_readiness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monotonic = ManualClock(start=0.0)
    database = FakeDatabase(monotonic, ahead=0.0)
    clock = DatabaseClock(database.readings, monotonic=monotonic.now)
    await clock.measure()
    told: list[bool] = []

    async def on_serving(ok: bool) -> None:
        told.append(ok)

    task = asyncio.create_task(
        keep_measuring(clock, interval=0.01, warn=1.0, limit=30.0, on_serving=on_serving)
    )
    try:
        database.up = False
        reads = database.reads
        await eventually(lambda: database.reads > reads + 3)
        assert not task.done()
        failures = [r for r in caplog.records if "cannot read the database's clock" in r.message]
        assert len(failures) == 1  # once per run of failures, not once per attempt
        database.up = True
        database.ahead = -40.0  # this host now 40 s ahead of the database
        await eventually(lambda: told == [False])
        database.ahead = -2.0
        await eventually(lambda: told == [False, True])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_skew_verdicts() -> None:
    assert judge_skew(0.5, warn=1.0, limit=30.0) == "ok"
    assert judge_skew(-1.5, warn=1.0, limit=30.0) == "warn"
    assert judge_skew(31.0, warn=1.0, limit=30.0) == "refuse"
    assert judge_skew(-31.0, warn=1.0, limit=30.0) == "refuse"
    assert judge_skew(3600.0, warn=1.0, limit=0.0) == "warn"  # limit 0: never refuse


def test_clock_settings_are_parsed_strictly() -> None:
    base = {"AUTH_KEK": "Xq3mZ8vR0bT5nL2wK7yD4hF9sJ1cG6pA0eU3iO8tN5w="}
    settings = Settings.from_env(base)
    assert (settings.clock_skew_warn, settings.clock_skew_max) == (1.0, 30.0)
    assert settings.clock_check_interval == 30.0
    assert Settings.from_env({**base, "AUTH_CLOCK_SKEW_MAX": "0"}).clock_skew_max == 0.0
    for name, value in (
        ("AUTH_CLOCK_SKEW_WARN", "0"),
        ("AUTH_CLOCK_SKEW_WARN", "nan"),
        ("AUTH_CLOCK_SKEW_MAX", "-1"),
        ("AUTH_CLOCK_SKEW_MAX", "0.5"),  # below the warning threshold
        ("AUTH_CLOCK_CHECK_INTERVAL", "0"),
        ("AUTH_CLOCK_CHECK_INTERVAL", "86400"),
    ):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({**base, name: value})
        assert str(caught.value).startswith(name), (name, value)
