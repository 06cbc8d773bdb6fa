"""Client-side balancing: AuthClient spreads calls round-robin over several replicas,
drops a replica from the rotation while it reports NOT_SERVING or is dead, and a client
with the documented retry policy loses no Validate call when a replica dies under load.

A gRPC channel keeps one HTTP/2 connection per address, so a client given one address
(or a plain TCP balancer) sends every call to one replica: these tests give it several.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from authsvc_client.client import (
    AuthClient,
    RetryPolicy,
    addresses_target,
    service_config,
)
from grpc_health.v1 import health_pb2

from service.app import shutdown_drain
from service.server import AUTH_SERVICE_NAME
from tests.live_server import PASSWORD, LiveServer, ServerFactory
from tests.replica_processes import VALIDATE, replicas, validate_load
from tests.test_cli import _server_env
from tests.test_replicas import _create_user

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _validate_calls(live: LiveServer) -> float:
    """Validate calls this in-process server answered OK (its own metrics registry)."""
    telemetry = live.running.telemetry
    assert telemetry is not None
    value = telemetry.registry.get_sample_value(
        "authsvc_rpc_calls_total", {"method": VALIDATE, "code": "OK"}
    )
    return value or 0.0


async def _until(condition: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Wait (liveness bound only) until `condition()` holds."""
    async with asyncio.timeout(limit):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.05)


async def test_calls_are_spread_over_every_replica_and_skip_one_reporting_not_serving(
    server_factory: ServerFactory,
) -> None:
    first = await server_factory(metrics_listen="127.0.0.1:0")
    second = await server_factory(metrics_listen="127.0.0.1:0")
    await first.create_user("alice")
    token = (await first.login("alice")).access_token

    async with AuthClient(target=[first.address, second.address]) as auth:
        for _ in range(40):
            assert (await auth.validate(token)).valid
        # Round robin: sequential calls alternate between the two connections.
        assert _validate_calls(first) >= 10
        assert _validate_calls(second) >= 10

        # The first replica reports NOT_SERVING (as while it drains): it leaves the
        # rotation as soon as its health Watch stream says so, without a failed call.
        await first.running.health.set(
            AUTH_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def only_second_answers() -> bool:
            before = _validate_calls(first)
            for _ in range(10):
                assert (await auth.validate(token)).valid
            return _validate_calls(first) == before

        await _until(only_second_answers)
        before_first, before_second = _validate_calls(first), _validate_calls(second)
        for _ in range(40):
            assert (await auth.validate(token)).valid
        assert _validate_calls(first) == before_first
        assert _validate_calls(second) == before_second + 40

        # SERVING again: back in the rotation.
        await first.running.health.set(AUTH_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

        async def first_answers_again() -> bool:
            before = _validate_calls(first)
            for _ in range(10):
                assert (await auth.validate(token)).valid
            return _validate_calls(first) > before

        await _until(first_answers_again)


async def test_one_address_pins_every_call_to_one_replica(
    server_factory: ServerFactory,
) -> None:
    """The problem the balanced client solves: one target, one connection, one replica."""
    first = await server_factory(metrics_listen="127.0.0.1:0")
    second = await server_factory(metrics_listen="127.0.0.1:0")
    await first.create_user("bob")
    token = (await first.login("bob")).access_token
    async with AuthClient(target=first.address) as auth:
        for _ in range(20):
            assert (await auth.validate(token)).valid
    assert (_validate_calls(first), _validate_calls(second)) == (20, 0)


@pytest.mark.system
@pytest.mark.parametrize("death", ["kill -9", "SIGTERM"])
async def test_a_replica_dying_under_load_costs_no_validate_call(
    database_url: str, tmp_path: Path, death: str
) -> None:
    """Two `authsvc serve` processes; a balanced AuthClient with the default (documented)
    retry policy keeps 16 Validate loops going while one replica is killed outright (or
    drained by SIGTERM): not one call fails, and the survivor takes the whole load."""
    env = _server_env(database_url, tmp_path)
    _create_user(env, "carol")
    with replicas(env, 2) as (doomed, survivor):
        async with AuthClient(target=[doomed.address, survivor.address]) as auth:
            token = (await auth.issue("carol", PASSWORD)).access_token

            async def die() -> None:
                # Both replicas answered before the death: the load was spread.
                assert doomed.calls() > 0
                assert survivor.calls() > 0
                if death == "kill -9":
                    await asyncio.to_thread(doomed.kill)
                else:
                    doomed.process.terminate()  # drains: NOT_SERVING, then stops

            result = await validate_load(
                auth, token, concurrency=16, before=1.5, after=2.5, midway=die
            )
            if death == "SIGTERM":
                assert await asyncio.to_thread(doomed.process.wait, 30) == 0
        assert result.failures == []
        assert result.succeeded_after_midway > 100
        assert survivor.calls() >= result.succeeded_after_midway


def test_the_deployed_service_config_is_the_clients_policy() -> None:
    """deploy/grpc-service-config.json (for clients in other languages) is what
    `service_config` builds with the default retry policy, so the two cannot drift."""
    shipped = json.loads((DEPLOY / "grpc-service-config.json").read_text())
    assert shipped == service_config(retry=RetryPolicy())
    assert shipped["loadBalancingConfig"] == [{"round_robin": {}}]
    assert shipped["healthCheckConfig"] == {"serviceName": "auth.v1.AuthService"}
    names = shipped["methodConfig"][0]["name"]
    assert {"service": "auth.v1.AuthService", "method": "Issue"} not in names
    assert {n["method"] for n in names} == {"Validate", "Refresh", "Revoke", "GetJwks"}


async def test_grpc_accepts_the_service_config_with_its_retry_policy(server: LiveServer) -> None:
    """gRPC parses the shipped config (an invalid one fails every call on the channel)."""
    config = (DEPLOY / "grpc-service-config.json").read_text()
    user = await server.create_user("dora")
    pair = await server.login(user.username)
    async with AuthClient(
        target=f"ipv4:{server.address}", options=[("grpc.service_config", config)]
    ) as auth:
        assert (await auth.validate(pair.access_token)).valid


@pytest.mark.parametrize(
    ("addresses", "target"),
    [
        (["10.0.0.5:50051", "10.0.0.6:50051"], "ipv4:10.0.0.5:50051,10.0.0.6:50051"),
        (["[fd00::5]:50051", "[fd00::6]:50051"], "ipv6:[fd00::5]:50051,[fd00::6]:50051"),
        (["127.0.0.1:1"], "ipv4:127.0.0.1:1"),
    ],
)
def test_addresses_become_one_static_target(addresses: list[str], target: str) -> None:
    assert addresses_target(addresses) == target


@pytest.mark.parametrize(
    "addresses",
    [
        [],
        "10.0.0.5:50051",  # a string, not a list of addresses
        ["authsvc-1:50051", "authsvc-2:50051"],  # names: use one DNS name instead
        ["10.0.0.5:50051", "[fd00::6]:50051"],  # mixed families
        ["10.0.0.5"],  # no port
        ["10.0.0.5:0"],
        ["[fd00::5]:50051", "fd00::6:50051"],  # host fd00::6 port 50051, or fd00::6:50051?
        ["10.0.0.5:050051"],
        ["10.0.0.5:50051,10.0.0.6:50051"],  # one element holding two
    ],
)
def test_addresses_that_cannot_be_one_target_are_refused(addresses: list[str]) -> None:
    with pytest.raises(ValueError, match="addresses"):
        addresses_target(addresses)


def test_a_balanced_client_says_so_and_a_single_target_is_untouched() -> None:
    balanced = AuthClient(target=["10.0.0.5:50051", "10.0.0.6:50051"])
    assert "ipv4:10.0.0.5:50051,10.0.0.6:50051" in repr(balanced)
    options = dict(balanced._options)
    assert json.loads(str(options["grpc.service_config"]))["loadBalancingConfig"] == [
        {"round_robin": {}}
    ]
    plain = AuthClient(target="authsvc:50051")
    assert "grpc.service_config" not in dict(plain._options)
    dns = AuthClient(target="dns:///authsvc-headless:50051", balance=True)
    assert "grpc.service_config" in dict(dns._options)


@pytest.mark.parametrize(("grace", "drain"), [(0.0, 0.0), (1.0, 0.5), (5.0, 1.0), (180.0, 1.0)])
def test_a_stopping_replica_serves_on_for_a_bounded_part_of_its_grace(
    grace: float, drain: float
) -> None:
    assert shutdown_drain(grace) == drain
