"""Races against the login throttle: concurrent guesses from one address, guesses whose
caller gives up before the password check ends, and IPv6 clients that own a whole /64."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc

from service.domain.login import CHECKS_PER_HASHING_THREAD
from service.domain.passwords import PasswordHasher
from service.domain.throttle import peer_key, user_key
from tests.helpers import error_info, login_reason
from tests.live_server import PASSWORD, ServerFactory

WRONG = "not the password"
PEER_ALLOWANCE = 20  # the default AUTH_THROTTLE_PEER_FAILURES
NOBODY_WAITS = 10**6
PEER = "ipv4:127.0.0.1:1"  # the test client's address (the port does not count)


class VerificationSpy:
    """Counts the argon2 verifications a server's hasher starts and how many still run;
    with a `slowdown`, each takes that much longer (a busy server's hashing)."""

    def __init__(
        self, hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch, *, slowdown: float = 0.0
    ) -> None:
        self.started = 0
        self.running = 0
        self.most_running = 0
        verify = hasher.verify

        async def counted(password_hash: str | None, password: str) -> bool:
            self.started += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            try:
                await asyncio.sleep(slowdown)
                return await verify(password_hash, password)
            finally:
                self.running -= 1

        monkeypatch.setattr(hasher, "verify", counted)


async def eventually(condition: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    """Wait (a liveness bound, not a speed test) until `condition` holds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_concurrent_guesses_from_one_address_check_no_more_passwords_than_its_allowance(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Password spraying: 100 concurrent guesses, each for another unknown username, from
    one address over two replicas. Only the allowance and the failure that starts the
    wait get their password checked; every other guess is refused unchecked."""
    replicas = [await server_factory(throttle_user_failures=NOBODY_WAITS) for _ in range(2)]
    spies = [
        VerificationSpy(replica.running.components.hasher, monkeypatch) for replica in replicas
    ]
    reasons = await asyncio.gather(
        *(login_reason(replicas[i % 2], f"sprayed-{i}", WRONG) for i in range(100))
    )
    checked = sum(spy.started for spy in spies)
    assert checked == PEER_ALLOWANCE + 1
    assert reasons.count("INVALID_CREDENTIALS") == PEER_ALLOWANCE + 1
    assert reasons.count("LOGIN_THROTTLED") == 100 - (PEER_ALLOWANCE + 1)


async def test_concurrent_right_passwords_from_one_address_all_succeed(
    server_factory: ServerFactory,
) -> None:
    """More concurrent logins from one address than its allowance (an office behind one
    NAT) wait for a free place instead of being refused: successes are not failures."""
    server = await server_factory(throttle_user_failures=1, throttle_peer_failures=2)
    for i in range(4):
        await server.create_user(f"colleague-{i}")
    reasons = await asyncio.gather(
        *(login_reason(server, f"colleague-{i % 4}", PASSWORD) for i in range(12))
    )
    assert reasons == ["OK"] * 12
    rows = await server.pool.fetch("SELECT key, failures FROM login_throttle WHERE failures > 0")
    assert rows == []


async def test_a_failure_amid_pending_right_passwords_waits_only_for_settled_failures(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway (one address for many users): 2 real failures of its allowance of 5,
    then 3 right passwords of other users held in their check, then a typo that fails
    meanwhile. The typo's reservation counted the 3 pending ones as failures (6 > 5), but
    at its settlement only 3 failures are settled: the address must not be made to wait,
    and once the 3 succeed a fourth user logs in."""
    server = await server_factory(throttle_peer_failures=5)
    for i in range(5):
        await server.create_user(f"behind-gateway-{i}")
    for i in range(2):
        assert await login_reason(server, f"nobody-{i}", WRONG) == "INVALID_CREDENTIALS"
    hasher = server.running.components.hasher
    verify = hasher.verify
    release = asyncio.Event()
    held = 0

    async def held_if_right(password_hash: str | None, password: str) -> bool:
        nonlocal held
        if password == PASSWORD:
            held += 1
            await release.wait()
        return await verify(password_hash, password)

    monkeypatch.setattr(hasher, "verify", held_if_right)
    pending = [
        asyncio.create_task(login_reason(server, f"behind-gateway-{i}", PASSWORD)) for i in range(3)
    ]
    try:  # released whatever happens: the server's stop waits for its checks
        await eventually(lambda: _true(held == 3))
        assert await login_reason(server, "behind-gateway-3", WRONG) == "INVALID_CREDENTIALS"
        locked = await server.pool.fetchval(
            "SELECT locked_until FROM login_throttle WHERE key = $1", peer_key(PEER)
        )
        assert locked is None
    finally:
        release.set()
    assert await asyncio.gather(*pending) == ["OK"] * 3
    assert await login_reason(server, "behind-gateway-4", PASSWORD) == "OK"
    failures = await server.pool.fetchval(
        "SELECT failures FROM login_throttle WHERE key = $1", peer_key(PEER)
    )
    assert failures == 3


@pytest.mark.system  # timing: 100 calls cut short by 20 ms deadlines
async def test_logins_cut_short_by_their_deadline_are_still_counted(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 wrong-password calls with a 20 ms deadline, shorter than the (slowed) hash:
    each check that starts runs to its end, and is counted against the username and the
    address and recorded as a login_failed event, although nobody waits for its answer."""
    server = await server_factory(
        throttle_user_failures=NOBODY_WAITS, throttle_peer_failures=NOBODY_WAITS
    )
    await server.create_user("impatient")
    spy = VerificationSpy(server.running.components.hasher, monkeypatch, slowdown=0.1)
    cut_short = 0
    other: list[str] = []
    for _ in range(100):
        await eventually(lambda: _true(spy.running == 0))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username="impatient", password=WRONG)
                ),
                timeout=0.02,
            )
        if caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            cut_short += 1
        else:
            other.append(f"{caught.value.code().name}: {caught.value.details()}")
    assert cut_short == 100, other

    async def failures_recorded() -> bool:
        events = await server.pool.fetchval(
            # Repeats of one address and username share a row (aggregated): its count.
            "SELECT coalesce(sum(occurrences), 0) FROM security_events WHERE kind = 'login_failed'"
        )
        # Every check that started is counted and recorded. (On a loaded machine a call
        # can be cut short before its check starts at all: nothing to count then.)
        return bool(spy.started > 0 and spy.running == 0 and events == spy.started)

    await eventually(failures_recorded)
    started = spy.started
    counts = dict(await server.pool.fetch("SELECT key, failures FROM login_throttle ORDER BY key"))
    assert counts == {
        user_key("impatient"): started,
        peer_key("ipv4:127.0.0.1:1"): started,
    }


async def test_right_passwords_whose_callers_left_are_not_counted_as_failures(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right passwords whose calls are cut short by their deadline during the (slowed)
    hash: the check runs to its end and its success is settled on its own (the session's
    statement, which would have carried the settlement, is never sent), so neither the
    username nor the address keeps a failure or a pending count."""
    server = await server_factory(
        throttle_user_failures=NOBODY_WAITS, throttle_peer_failures=NOBODY_WAITS
    )
    await server.create_user("hurried")
    spy = VerificationSpy(server.running.components.hasher, monkeypatch, slowdown=0.2)
    for _ in range(5):
        await eventually(lambda: _true(spy.running == 0))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username="hurried", password=PASSWORD)
                ),
                timeout=0.05,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def settled() -> bool:
        rows = await server.pool.fetch("SELECT failures, pending FROM login_throttle")
        return bool(
            spy.started > 0
            and spy.running == 0
            and rows
            and all(r["failures"] == 0 and r["pending"] == 0 for r in rows)
        )

    await eventually(settled, within=10)
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0


async def test_checks_whose_callers_left_cannot_pile_up(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks run to their end without their callers, but only as many at once as the
    process has places for: 200 calls cut short at once start no more checks than that,
    and each check started is counted."""
    server = await server_factory(
        throttle_user_failures=NOBODY_WAITS, throttle_peer_failures=NOBODY_WAITS
    )
    hasher = server.running.components.hasher
    spy = VerificationSpy(hasher, monkeypatch, slowdown=0.5)
    places = CHECKS_PER_HASHING_THREAD * hasher.threads

    async def cut_short(i: int) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Issue(
                auth_pb2.IssueRequest(
                    password=auth_pb2.PasswordCredentials(username=f"hasty-{i}", password=WRONG)
                ),
                timeout=0.1,
            )
        return caught.value.code()

    codes = await asyncio.gather(*(cut_short(i) for i in range(200)))
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}

    async def all_started_checks_counted() -> bool:
        counted = await server.pool.fetchval(
            "SELECT failures FROM login_throttle WHERE key = $1", peer_key("ipv4:127.0.0.1:1")
        )
        # Every check that started is counted (an attempt counted whose check then failed
        # to reach the hash, say on a database timeout under load, counts too).
        return bool(spy.started > 0 and spy.running == 0 and (counted or 0) >= spy.started)

    await eventually(all_started_checks_counted)
    assert spy.started <= places
    assert spy.most_running <= places


async def _true(value: bool) -> bool:
    return value


def test_ipv6_peers_are_grouped_by_their_64_bit_prefix() -> None:
    # gRPC writes IPv6 peers percent-encoded: "ipv6:%5B::1%5D:port".
    one = peer_key("ipv6:%5B2001:db8:1:2:aaaa::1%5D:40000")
    assert one == "peer:ipv6:2001:db8:1:2::/64"
    assert peer_key("ipv6:[2001:db8:1:2:ffff:ffff:ffff:ffff]:1") == one
    assert peer_key("ipv6:[2001:db8:1:3::1]:1") != one
    assert peer_key("ipv6:%5B::1%5D:5") == "peer:ipv6:::/64"
    # IPv4 clients of a dual-stack listener are their IPv4 address.
    assert peer_key("ipv6:[::ffff:192.0.2.7]:5000") == peer_key("ipv4:192.0.2.7:6000")
    assert peer_key("ipv4:192.0.2.7:6000") == "peer:ipv4:192.0.2.7"
    # Link-local scopes do not make separate keys.
    assert peer_key("ipv6:%5Bfe80::1%25eth0%5D:80") == "peer:ipv6:fe80::/64"
    # Anything else keeps its address without the port.
    assert peer_key("unix:/tmp/socket") == "peer:unix:/tmp/socket"
    assert peer_key("ipv4:not-an-address:1") == "peer:ipv4:not-an-address"


async def test_an_ipv6_client_is_throttled_by_its_64_bit_prefix(
    server_factory: ServerFactory,
) -> None:
    """A live server on [::1]: the gRPC peer string of an IPv6 client becomes the /64 key."""
    server = await server_factory(
        listen="[::1]:0", throttle_user_failures=NOBODY_WAITS, throttle_peer_failures=1
    )
    async with grpc.aio.insecure_channel(f"[::1]:{server.running.port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        reasons = []
        for i in range(3):
            try:
                await stub.Issue(
                    auth_pb2.IssueRequest(
                        password=auth_pb2.PasswordCredentials(username=f"v6-{i}", password=WRONG)
                    )
                )
            except grpc.aio.AioRpcError as error:
                reasons.append(error_info(error).reason)
    assert reasons == ["INVALID_CREDENTIALS", "INVALID_CREDENTIALS", "LOGIN_THROTTLED"]
    keys = {
        r["key"]
        for r in await server.pool.fetch("SELECT key FROM login_throttle WHERE key LIKE 'peer:%'")
    }
    assert keys == {"peer:ipv6:::/64"}
