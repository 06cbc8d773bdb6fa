"""PostgreSQL failover under two running replicas (docs/failover.md).

A primary and a standby made with PostgreSQL's own tools (tests/replicated_pg.py), two
authsvc replicas on the multi-host URL with target_session_attrs=read-write, clients
walking refresh chains; then `kill -9` of the primary and the promotion of the standby
(`pg_promote()`). With a synchronous standby nothing a client received is lost; with an
asynchronous one, what was not replicated yet is, and the test shows what a client then
sees. The figures (time to writable, chains that continued) are shown after the run's summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2, auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.components import start_database_clock
from service.database import create_pool
from service.server import REVOCATIONS_HEALTH_NAME, RunningServer, start_server
from service.settings import Settings
from service.store import apply_migrations
from tests.helpers import assert_error, error_info
from tests.live_server import PASSWORD, TEST_KEK, SecretsSeen, _RecordSecrets
from tests.replicated_pg import (
    DATABASE,
    Node,
    detach_standby,
    make_primary,
    make_standby,
    make_synchronous,
    wait_until,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

Code = grpc.StatusCode
CALL_TIMEOUT = 10.0  # no single call may hang longer
DB_TIMEOUT = 2.0  # AUTH_DB_TIMEOUT of the replicas
CHAINS = 12
# The promotion's target (the issue's): writable again within this after the promotion.
WRITABLE_WITHIN = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# The cluster and the replicas


@dataclass
class Cluster:
    primary: Node
    standby: Node

    @property
    def dsn(self) -> str:
        """Both hosts; asyncpg tries them in order and keeps the one that accepts writes."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"


@pytest.fixture
async def cluster(throwaway_pg_dir: Path) -> AsyncIterator[Cluster]:
    """A migrated primary and its (asynchronous) hot standby."""
    nodes: list[Node] = []
    try:
        primary = await asyncio.to_thread(make_primary, throwaway_pg_dir)
        nodes.append(primary)
        admin = await asyncpg.connect(primary.admin_uri)
        try:
            await admin.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(primary.uri)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        standby = await asyncio.to_thread(make_standby, primary, throwaway_pg_dir)
        nodes.append(standby)
        yield Cluster(primary, standby)
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)


@dataclass
class Replica:
    """One authsvc replica in this process, on the multi-host URL."""

    running: RunningServer
    pool: asyncpg.Pool
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.AuthServiceAsyncStub

    async def login(self, username: str) -> auth_pb2.TokenPair:
        response = await self.stub.Issue(
            auth_pb2.IssueRequest(
                password=auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
            ),
            timeout=CALL_TIMEOUT,
        )
        return response.tokens

    async def refresh(self, token: str) -> auth_pb2.TokenPair:
        response = await self.stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=token), timeout=CALL_TIMEOUT
        )
        return response.tokens

    async def validate(self, access_token: str) -> auth_pb2.ValidateResponse:
        return await self.stub.Validate(
            auth_pb2.ValidateRequest(access_token=access_token), timeout=CALL_TIMEOUT
        )

    async def revoke(self, access_token: str) -> None:
        await self.stub.Revoke(
            auth_pb2.RevokeRequest(access_token=access_token), timeout=CALL_TIMEOUT
        )

    async def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        status: int = reply.status
        return status


@pytest.fixture
async def replicas(
    cluster: Cluster, tmp_path: Path, secrets_seen: SecretsSeen
) -> AsyncIterator[list[Replica]]:
    """Two replicas started as `authsvc serve` starts one (the database's clock included)."""
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            settings = Settings(
                listen="127.0.0.1:0",
                database_url=cluster.dsn,
                data_dir=tmp_path / name,
                kek=TEST_KEK,
                db_timeout=DB_TIMEOUT,
            )
            pool = await create_pool(cluster.dsn, settings)
            try:
                clock = await start_database_clock(settings, pool)
                running = await start_server(settings, dsn=cluster.dsn, pool=pool, clock=clock)
            except BaseException:
                await pool.close()
                raise
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{running.port}", interceptors=[_RecordSecrets(secrets_seen)]
            )
            started.append(Replica(running, pool, channel, auth_pb2_grpc.AuthServiceStub(channel)))
        yield started
    finally:
        for replica in started:
            await replica.channel.close()
            await replica.running.stop(None)
            # The dead primary may still hold connections being torn down: do not wait.
            replica.pool.terminate()


async def create_users(replica: Replica, count: int, prefix: str) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        await replica.running.components.users.create(name, PASSWORD, ())
    return names


# Clients


def reason_of(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}/{error_info(error).reason or '-'}"


@dataclass
class Chain:
    """One client: refreshes its newest token on one replica, validates the access token
    on the other, and keeps the newest token it *received* (a failed call changes nothing)."""

    refresh_token: str
    access_token: str
    received: int = 0
    # Rotations whose call started after the promotion had completed: the chain went on.
    after_promotion: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    broken: str | None = None


@dataclass
class Failover:
    killed_at: float | None = None
    promoted_at: float | None = None
    first_write_at: float | None = None


async def walk(
    chain: Chain, replicas: list[Replica], failover: Failover, stop: asyncio.Event
) -> None:
    turn = 0
    while not stop.is_set():
        refreshing, validating = replicas[turn % 2], replicas[(turn + 1) % 2]
        turn += 1
        started = time.monotonic()
        try:
            pair = await refreshing.refresh(chain.refresh_token)
        except grpc.aio.AioRpcError as error:
            chain.errors[reason_of(error)] += 1
            if error.code() != Code.UNAVAILABLE:
                chain.broken = reason_of(error)
                return
            await asyncio.sleep(0.05)
            continue
        chain.refresh_token, chain.access_token = pair.refresh_token, pair.access_token
        chain.received += 1
        if failover.promoted_at is not None and started >= failover.promoted_at:
            chain.after_promotion += 1
            if failover.first_write_at is None:
                failover.first_write_at = time.monotonic()
        verdict = await validating.validate(chain.access_token)
        if not verdict.valid:
            chain.broken = f"validate: {verdict.error}"
            return
        await asyncio.sleep(0.02)


async def revoked_everywhere(replicas: list[Replica], access_token: str) -> bool:
    for replica in replicas:
        verdict = await replica.validate(access_token)
        if verdict.error != auth_pb2.VALIDATION_ERROR_REVOKED:
            return False
    return True


async def kill_and_promote(cluster: Cluster, failover: Failover) -> float:
    """`kill -9` the primary, promote the standby; how long the promotion took."""
    await asyncio.to_thread(cluster.primary.kill)
    failover.killed_at = time.monotonic()
    await asyncio.sleep(0.5)  # the replicas notice, clients fail UNAVAILABLE meanwhile
    before = time.monotonic()
    await cluster.standby.promote()
    failover.promoted_at = time.monotonic()
    return failover.promoted_at - before


async def until_writable(
    call: Callable[[], Awaitable[object]], failover: Failover, *, within: float
) -> float:
    """Retry `call` while it fails UNAVAILABLE; seconds from the promotion to its success."""
    assert failover.promoted_at is not None
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.UNAVAILABLE:
                raise AssertionError(f"failed otherwise: {reason_of(error)}") from error
            if time.monotonic() - failover.promoted_at >= within:
                raise AssertionError(f"not writable within {within:g}s") from error
            await asyncio.sleep(0.02)
            continue
        return time.monotonic() - failover.promoted_at


# 1. Synchronous standby: nothing a client received is lost


async def test_failover_to_a_synchronous_standby_loses_no_rotation_and_no_revocation(
    cluster: Cluster, replicas: list[Replica], report_figure: Callable[[str], None]
) -> None:
    await make_synchronous(cluster.primary)
    a, b = replicas
    names = await create_users(a, CHAINS + 5, "sync")
    chains = [
        Chain(pair.refresh_token, pair.access_token)
        for pair in [await a.login(name) for name in names[:CHAINS]]
    ]
    # Revoked before the crash (acknowledged, so on the standby too).
    revoked_before = [await b.login(name) for name in names[CHAINS : CHAINS + 3]]
    for pair in revoked_before:
        await a.revoke(pair.access_token)
    # Revoked after the promotion, through the replica that did not serve the login.
    revoked_after = [await a.login(name) for name in names[CHAINS + 3 :]]

    failover = Failover()
    stop = asyncio.Event()
    walkers = [asyncio.create_task(walk(chain, replicas, failover, stop)) for chain in chains]
    try:
        await asyncio.sleep(1.5)  # rotations under way on both replicas
        assert all(chain.received > 0 for chain in chains)
        promotion = await kill_and_promote(cluster, failover)
        await wait_until(
            lambda: failover.first_write_at is not None or any(c.broken for c in chains),
            within=30,
            what="a successful refresh after the promotion",
        )
        await wait_until(
            lambda: all(c.after_promotion >= 2 or c.broken for c in chains),
            within=30,
            what="every chain rotating again",
        )
    finally:
        stop.set()
        await asyncio.gather(*walkers)

    assert [c.broken for c in chains if c.broken] == []
    # Only UNAVAILABLE while no primary was reachable: no REFRESH_TOKEN_INVALID, no reuse.
    seen = sum((c.errors for c in chains), Counter[str]())
    assert set(seen) <= {"UNAVAILABLE/DATABASE_UNAVAILABLE"}, seen
    continued = sum(1 for c in chains if c.after_promotion > 0)
    assert continued == CHAINS
    assert failover.first_write_at is not None and failover.promoted_at is not None
    writable = failover.first_write_at - failover.promoted_at
    assert writable <= WRITABLE_WITHIN

    # Each chain goes on from the last token its client received, on either replica.
    for chain in chains:
        await b.refresh(chain.refresh_token)

    # Revocations made before the crash still hold: in the database and in memory.
    for pair in revoked_before:
        assert await revoked_everywhere(replicas, pair.access_token)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.refresh(pair.refresh_token)
        assert_error(caught.value, Code.UNAUTHENTICATED, "SESSION_REVOKED")

    # Revocations made after it, through either replica, reach both: at once if the
    # listeners are back, or by their full read when they reconnect (to the new primary).
    started = time.monotonic()
    for turn, pair in enumerate(revoked_after):
        await replicas[turn % 2].revoke(pair.access_token)
    for pair in revoked_after:
        await wait_until(
            partial(revoked_everywhere, replicas, pair.access_token),
            within=5,
            what="a revocation after the failover on both replicas",
        )
    propagated = time.monotonic() - started
    for replica in replicas:
        await wait_until(
            partial(replica_health_is, replica, SERVING),
            within=5,
            what="authsvc.revocations SERVING again",
        )
    listening = time.monotonic() - failover.promoted_at

    # No session was revoked but the ones revoked on purpose (no reuse was detected).
    conn = await asyncpg.connect(cluster.standby.uri)
    try:
        revoked = await conn.fetchval("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL")
    finally:
        await conn.close()
    assert revoked == len(revoked_before) + len(revoked_after)

    report_figure(
        f"synchronous standby: writable {writable:.2f}s after the promotion "
        f"(the promotion itself {promotion:.2f}s, kill -9 to promote 0.5s); "
        f"{continued}/{CHAINS} chains continued, "
        f"{seen['UNAVAILABLE/DATABASE_UNAVAILABLE']} UNAVAILABLE answers meanwhile, "
        f"no other error; revocations after it on both replicas within {propagated:.2f}s, "
        f"both listeners back {listening:.2f}s after the promotion"
    )


# 2. Asynchronous standby: what was not replicated yet is lost


async def test_failover_to_an_asynchronous_standby_loses_what_it_had_not_received(
    cluster: Cluster, replicas: list[Replica], report_figure: Callable[[str], None]
) -> None:
    a, b = replicas
    names = await create_users(a, CHAINS + 3, "async")
    received = [await a.login(name) for name in names[:CHAINS]]
    # The last tokens the standby has: one rotation each, then wait for it to replay them.
    replicated = [await b.refresh(pair.refresh_token) for pair in received]
    logged_out = await a.login(names[CHAINS])
    probe = await b.login(names[CHAINS + 2])  # to see when the service is writable again
    await wait_for_replay(cluster)

    # The standby falls behind (here: cut off); the primary acknowledges on its own.
    await detach_standby(cluster.standby, cluster.primary)
    lost = [await a.refresh(pair.refresh_token) for pair in replicated]
    newest = [await b.refresh(pair.refresh_token) for pair in lost]
    await b.revoke(logged_out.access_token)
    await wait_until(
        lambda: revoked_everywhere(replicas, logged_out.access_token),
        within=5,
        what="the logout on both replicas",
    )
    signed_up = await a.login(names[CHAINS + 1])

    failover = Failover()
    promotion = await kill_and_promote(cluster, failover)
    writable = await until_writable(lambda: a.refresh(probe.refresh_token), failover, within=30)
    assert writable <= WRITABLE_WITHIN

    # A client holding its newest token (what a client keeps) has lost its session: the
    # token, and its parent, are unknown to the new primary. Validate still accepts the
    # access tokens it was given: they are signed, not looked up.
    for token in [*newest, *lost]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.refresh(token.refresh_token)
        assert_error(caught.value, Code.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")
    assert (await b.validate(newest[1].access_token)).valid
    # The last token the standby had is unused there: presented again it rotates, to the
    # very child the lost rotation had given (children are derived from their parents).
    children = [await b.refresh(pair.refresh_token) for pair in replicated]
    assert [c.refresh_token for c in children] == [p.refresh_token for p in lost]
    # A session created while the standby was behind is gone with it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await a.refresh(signed_up.refresh_token)
    assert_error(caught.value, Code.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")
    # The logout is undone in the database: its refresh token rotates again. The running
    # replicas still remember it (their memory is never rolled back), so Validate refuses
    # that session's tokens there; a replica started after the failover would not.
    revived = await a.refresh(logged_out.refresh_token)
    assert revived.session_id == logged_out.session_id
    assert await revoked_everywhere(replicas, revived.access_token)

    report_figure(
        f"asynchronous standby: writable {writable:.2f}s after the promotion "
        f"(the promotion itself {promotion:.2f}s); of {CHAINS} chains, the {CHAINS} that had "
        "rotated twice while the standby was behind continued only from the token the standby "
        "had (their newest: REFRESH_TOKEN_INVALID); a session and a logout from that time lost"
    )


async def wait_for_replay(cluster: Cluster) -> None:
    """Until the standby has replayed everything the primary has written so far."""
    primary = await asyncpg.connect(cluster.primary.admin_uri)
    standby = await asyncpg.connect(cluster.standby.admin_uri)
    try:
        written = await primary.fetchval("SELECT pg_current_wal_lsn()")

        async def replayed() -> bool:
            behind = await standby.fetchval(
                "SELECT pg_wal_lsn_diff($1, pg_last_wal_replay_lsn())", written
            )
            return bool(behind <= 0)

        await wait_until(replayed, within=30, what="the standby replays the primary's WAL")
    finally:
        await primary.close()
        await standby.close()


# 3. No primary at all: Validate answers from memory, writes fail fast


async def test_while_no_primary_is_reachable_validate_answers_and_writes_fail_fast(
    cluster: Cluster, replicas: list[Replica]
) -> None:
    a, b = replicas
    names = await create_users(a, 2, "down")
    pair = await a.login(names[0])
    revoked = await a.login(names[1])
    await a.revoke(revoked.access_token)
    await wait_until(
        lambda: revoked_everywhere(replicas, revoked.access_token),
        within=5,
        what="the revocation on both replicas",
    )

    await asyncio.to_thread(cluster.primary.kill)  # the standby stays read-only
    for replica in replicas:
        await wait_until(
            partial(replica_health_is, replica, NOT_SERVING),
            within=10,
            what="authsvc.revocations NOT_SERVING once the listener lost the primary",
        )

    for replica in replicas:
        # Validate: from memory, valid and revoked alike.
        assert (await replica.validate(pair.access_token)).valid
        verdict = await replica.validate(revoked.access_token)
        assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
        # Writes: UNAVAILABLE within AUTH_DB_TIMEOUT and a margin, however often tried.
        calls: list[Callable[[], Awaitable[object]]] = [
            partial(replica.refresh, pair.refresh_token),
            partial(replica.login, names[0]),
            partial(replica.revoke, pair.access_token),
        ]
        for call in calls:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call()
                assert_error(caught.value, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                assert time.monotonic() - started < DB_TIMEOUT + 2.0
        assert await replica.health("auth.v1.AuthService") == SERVING

    # Nothing was lost or changed by the failed calls: after the promotion the token rotates.
    failover = Failover()
    await cluster.standby.promote()
    failover.promoted_at = time.monotonic()
    await until_writable(lambda: b.refresh(pair.refresh_token), failover, within=10)


async def replica_health_is(replica: Replica, status: int) -> bool:
    return await replica.health(REVOCATIONS_HEALTH_NAME) == status
