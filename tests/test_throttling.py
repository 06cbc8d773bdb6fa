"""Brute-force throttling of failed logins: per username, per address, across replicas,
growing delays with RetryInfo, expiring by itself, cleared by a successful login."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2
from google.rpc import error_details_pb2

from service.clock import to_datetime
from service.domain.records import ThrottleState
from service.domain.throttle import (
    PENDING_EXPIRY,
    ThrottlePolicy,
    decide_failure_waits,
    peer_key,
    settled_failures,
)
from tests.helpers import assert_error, error_info, status_detail
from tests.live_server import PASSWORD, LiveServer, ServerFactory

WRONG = "not the password"


async def _login(server: LiveServer, username: str, password: str) -> grpc.aio.AioRpcError | None:
    try:
        await server.login(username, password=password)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def _fails(
    server: LiveServer, username: str, password: str, reason: str
) -> grpc.aio.AioRpcError:
    error = await _login(server, username, password)
    assert error is not None, "login should have failed"
    code = (
        grpc.StatusCode.RESOURCE_EXHAUSTED
        if reason == "LOGIN_THROTTLED"
        else grpc.StatusCode.UNAUTHENTICATED
    )
    assert_error(error, code, reason)
    return error


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    info = status_detail(error, error_details_pb2.RetryInfo)
    return info.retry_delay.ToMilliseconds() / 1000


async def test_growing_delays_then_a_success_clears_the_count(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(throttle_user_failures=3, throttle_peer_failures=100)
    await server.create_user("mallory-target")
    for _ in range(3):  # the free allowance
        await _fails(server, "mallory-target", WRONG, "INVALID_CREDENTIALS")
    await _fails(server, "mallory-target", WRONG, "INVALID_CREDENTIALS")  # 4th: now waits 1 s
    # While it waits, even the right password is not checked.
    throttled = await _fails(server, "mallory-target", PASSWORD, "LOGIN_THROTTLED")
    assert _retry_delay(throttled) == pytest.approx(1.0, abs=0.01)

    server.clock.advance(1.5)
    await _fails(server, "mallory-target", WRONG, "INVALID_CREDENTIALS")  # 5th: waits 2 s
    assert _retry_delay(
        await _fails(server, "mallory-target", PASSWORD, "LOGIN_THROTTLED")
    ) == pytest.approx(2.0, abs=0.01)
    server.clock.advance(2.5)
    await _fails(server, "mallory-target", WRONG, "INVALID_CREDENTIALS")  # 6th: waits 4 s
    server.clock.advance(4.5)

    assert await _login(server, "mallory-target", PASSWORD) is None
    # The success cleared the username's count: the allowance is whole again.
    for _ in range(3):
        await _fails(server, "mallory-target", WRONG, "INVALID_CREDENTIALS")
    assert await _login(server, "mallory-target", PASSWORD) is None


async def test_unknown_usernames_are_throttled_alike(server_factory: ServerFactory) -> None:
    server = await server_factory(throttle_user_failures=1, throttle_peer_failures=100)
    await server.create_user("known")
    for name in ("known", "nobody-by-this-name"):
        await _fails(server, name, WRONG, "INVALID_CREDENTIALS")
        await _fails(server, name, WRONG, "INVALID_CREDENTIALS")
        error = await _fails(server, name, WRONG, "LOGIN_THROTTLED")
        assert _retry_delay(error) == pytest.approx(1.0, abs=0.01)
        assert error.details() == "too many failed logins; retry later"


async def test_an_address_is_throttled_across_usernames(server_factory: ServerFactory) -> None:
    server = await server_factory(throttle_user_failures=100, throttle_peer_failures=2)
    await server.create_user("victim")
    for i in range(3):
        await _fails(server, f"sprayed-{i}", WRONG, "INVALID_CREDENTIALS")
    # Password spraying from one address: a fresh username is refused too.
    await _fails(server, "victim", PASSWORD, "LOGIN_THROTTLED")


async def test_counts_expire_by_themselves_and_delays_are_capped(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(
        throttle_user_failures=0,
        throttle_peer_failures=100,
        throttle_max_delay=5,
        throttle_window=60,
    )
    await server.create_user("capped")
    delays = []
    for _ in range(6):
        await _fails(server, "capped", WRONG, "INVALID_CREDENTIALS")
        delays.append(_retry_delay(await _fails(server, "capped", PASSWORD, "LOGIN_THROTTLED")))
        server.clock.advance(6)
    assert delays == pytest.approx([1, 2, 4, 5, 5, 5], abs=0.01)
    # A full window without a failure: the count starts over (never a permanent lock-out).
    server.clock.advance(61)
    await _fails(server, "capped", WRONG, "INVALID_CREDENTIALS")
    assert _retry_delay(
        await _fails(server, "capped", PASSWORD, "LOGIN_THROTTLED")
    ) == pytest.approx(1.0, abs=0.01)


async def test_throttling_holds_across_replicas(server_factory: ServerFactory) -> None:
    first = await server_factory(throttle_user_failures=1, throttle_peer_failures=100)
    second = await server_factory(throttle_user_failures=1, throttle_peer_failures=100)
    await first.create_user("shared")
    await _fails(first, "shared", WRONG, "INVALID_CREDENTIALS")
    await _fails(first, "shared", WRONG, "INVALID_CREDENTIALS")
    await _fails(second, "shared", PASSWORD, "LOGIN_THROTTLED")


async def test_throttling_can_be_turned_off(server_factory: ServerFactory) -> None:
    server = await server_factory(login_throttle=False)
    await server.create_user("free")
    for _ in range(8):
        await _fails(server, "free", WRONG, "INVALID_CREDENTIALS")
    assert await _login(server, "free", PASSWORD) is None


async def test_throttled_logins_are_security_events(server_factory: ServerFactory) -> None:
    server = await server_factory(throttle_user_failures=0, throttle_peer_failures=100)
    await _fails(server, "ghost", WRONG, "INVALID_CREDENTIALS")
    await _fails(server, "ghost", WRONG, "LOGIN_THROTTLED")
    kinds = [
        r["kind"]
        for r in await server.pool.fetch(
            "SELECT kind FROM security_events WHERE kind LIKE 'login%' ORDER BY id"
        )
    ]
    assert kinds == ["login_failed", "login_throttled"]


def test_policy_delays_double_from_the_first_failure_over_the_allowance() -> None:
    policy = ThrottlePolicy(free_failures=5, base_delay=1.0, max_delay=900.0)
    assert [policy.delay_after(n) for n in range(1, 6)] == [0, 0, 0, 0, 0]
    assert [policy.delay_after(n) for n in (6, 7, 8, 15, 16)] == [1, 2, 4, 512, 900]
    assert policy.delay_after(10_000) == 900
    # The default allowance stays well under ASVS's 100 failures an hour per account.
    elapsed, failures = 0.0, 0
    while elapsed < 3600:
        failures += 1
        elapsed += policy.delay_after(failures)
    assert failures < 25


NOW = 1_900_000_000.0


def _row(
    failures: int, pending: int, *, pending_age: float = 0.0, failure_age: float = 0.0
) -> ThrottleState:
    return ThrottleState(
        key="peer:ipv4:192.0.2.7",
        failures=failures,
        last_failure_at=to_datetime(NOW - failure_age),
        locked_until=None,
        pending=pending,
        pending_at=to_datetime(NOW - pending_age),
    )


def test_a_failure_waits_for_the_failures_settled_so_far() -> None:
    """`settled_failures`: the key's count at settlement less the other attempts pending
    (counted when reserved, they may yet succeed); this failure always counts."""
    policy = ThrottlePolicy(free_failures=5)
    assert settled_failures(_row(6, 4), policy, now=NOW) == 3  # 3 others pending
    assert settled_failures(_row(6, 1), policy, now=NOW) == 6  # only this one pending
    # A pending count older than PENDING_EXPIRY is ignored, as by the reservation.
    assert settled_failures(_row(6, 4, pending_age=PENDING_EXPIRY + 1), policy, now=NOW) == 6
    # Failures older than the window are forgotten: only this one is left.
    assert settled_failures(_row(6, 1, failure_age=policy.window + 1), policy, now=NOW) == 1
    # A username cleared by a success while others were pending (failures 0, pending 2).
    assert settled_failures(_row(0, 2), policy, now=NOW) == 1


def test_the_last_failure_of_a_burst_to_settle_sets_the_wait() -> None:
    """free + 1 parallel guesses (the most the reservation counts at once): each settles
    with the others still pending but the last, which sees them all settled and waits."""
    policies = {"peer:ipv4:192.0.2.7": ThrottlePolicy(free_failures=5)}
    waits = [
        decide_failure_waits([_row(6, pending)], policies, now=NOW)["peer:ipv4:192.0.2.7"]
        for pending in range(6, 0, -1)
    ]
    assert waits == [None] * 5 + [to_datetime(NOW + 1.0)]


def test_peer_keys_drop_the_port() -> None:
    assert peer_key("ipv4:127.0.0.1:53211") == "peer:ipv4:127.0.0.1"
    assert peer_key("ipv6:[::1]:40000") == "peer:ipv6:::/64"  # an IPv6 address's /64
    assert peer_key("unix:/tmp/socket") == "peer:unix:/tmp/socket"


async def test_validation_of_requests_is_not_a_failed_login(server_factory: ServerFactory) -> None:
    """Malformed requests never reach the password check, so they are not counted."""
    server = await server_factory(throttle_user_failures=0, throttle_peer_failures=0)
    await server.create_user("careful")
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Issue(
                auth_pb2.IssueRequest(password=auth_pb2.PasswordCredentials(username="careful"))
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _login(server, "careful", PASSWORD) is None


async def test_a_burst_of_concurrent_guesses_cannot_slip_past_the_allowance(
    server_factory: ServerFactory,
) -> None:
    """Attempts are counted before the (slow) password check, one at a time per key."""
    server = await server_factory(throttle_user_failures=3, throttle_peer_failures=10**6)
    await server.create_user("burst")
    results = await asyncio.gather(
        *(_login(server, "burst", WRONG) for _ in range(30)), return_exceptions=True
    )
    reasons = [error_info(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(reasons) == 30
    # The 3 free attempts and the 4th (which starts the wait) had their password checked.
    assert reasons.count("INVALID_CREDENTIALS") == 4
    assert reasons.count("LOGIN_THROTTLED") == 26
