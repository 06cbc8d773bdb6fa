"""Faults under a running server: a database connection cut in the middle of a rotation,
PostgreSQL stopped and started again under the server, and revocations made while a
replica's revocation listener is down.

Every test ends with `assert_family_invariants`, which checks the refresh-token families
over the whole database (and is itself shown able to fail on a hand-corrupted database).
Nothing here sleeps and hopes: conditions are polled under deadlines, calls carry timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from authsvc_client.gen.auth.v1 import auth_pb2

from service.clock import ManualClock, to_datetime
from service.domain.refresh_tokens import hash_token
from service.settings import Settings
from service.store.invariants import (
    family_invariant_violations as store_invariant_violations,
)
from service.store.refresh_tokens import ROTATE_FRESH_TOKEN_SQL
from service.store.revocation_feed import LISTENER_APPLICATION_NAME
from tests.helpers import assert_error
from tests.live_server import (
    PASSWORD,
    TEST_KEK,
    LiveServer,
    ServerFactory,
    start_live_server,
    stop_live_server,
)
from tests.throwaway_pg import (
    socket_dir_of,
    start_embedded_postgres,
    start_migrated,
    stop_embedded_postgres,
)

pytestmark = pytest.mark.timeout(45)

Code = grpc.StatusCode
T = TypeVar("T")
CALL_TIMEOUT = 15.0  # seconds: no single gRPC call here may hang longer


# Refresh-token family invariants


async def family_invariant_violations(
    pool: asyncpg.Pool, *, now: datetime | None = None
) -> list[str]:
    """Every broken refresh-token family invariant in the database, one line each.

    `now` decides which sessions are past expires_at (default: the database's now()).
    """
    async with pool.acquire(timeout=10) as conn:
        return await store_invariant_violations(conn, now=now)


async def assert_family_invariants(pool: asyncpg.Pool, *, now: datetime | None = None) -> None:
    """Fails the test if any refresh-token family in the database is inconsistent."""
    problems = await family_invariant_violations(pool, now=now)
    assert not problems, "refresh-token family invariants broken:\n" + "\n".join(problems)


def _now(clock: ManualClock) -> datetime:
    return to_datetime(clock.now())


# Small helpers


def _issue(server: LiveServer, username: str) -> Awaitable[auth_pb2.IssueResponse]:
    return server.stub.Issue(
        auth_pb2.IssueRequest(
            password=auth_pb2.PasswordCredentials(username=username, password=PASSWORD)
        ),
        timeout=CALL_TIMEOUT,
    )


def _refresh(server: LiveServer, token: str) -> Awaitable[auth_pb2.RefreshResponse]:
    return server.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=token), timeout=CALL_TIMEOUT)


def _validate(server: LiveServer, token: str) -> Awaitable[auth_pb2.ValidateResponse]:
    return server.stub.Validate(auth_pb2.ValidateRequest(access_token=token), timeout=CALL_TIMEOUT)


async def _fails_with(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert_error(caught.value, code, reason)


async def _until(
    condition: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.02
) -> float:
    """Poll `condition` until it holds; how long that took. Fails past `within` seconds."""
    start = time.monotonic()
    while not await condition():
        elapsed = time.monotonic() - start
        assert elapsed < within, f"{what}: not seen within {within}s"
        await asyncio.sleep(every)
    return time.monotonic() - start


async def _succeeds_within(make_call: Callable[[], Awaitable[T]], *, within: float, what: str) -> T:
    """Retry `make_call` while it fails UNAVAILABLE, until `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await make_call()
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.UNAVAILABLE or time.monotonic() >= deadline:
                raise AssertionError(
                    f"{what}: still failing after {within}s: {error.code()} {error.details()}"
                ) from error
        await asyncio.sleep(0.05)


async def _token_rows(pool: asyncpg.Pool, session_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE session_id = $1", uuid.UUID(session_id)
    )
    return count


# 1. The checker itself can fail


async def test_invariant_checker_fails_on_a_corrupted_database(
    server: LiveServer, clock: ManualClock
) -> None:
    await server.create_user("corrupt")
    rotated_pair = await server.login("corrupt")
    child = (await _refresh(server, rotated_pair.refresh_token)).tokens
    await server.login("corrupt")  # a second, untouched live session
    revoked_pair = await server.login("corrupt")
    revoke = await server.stub.Revoke(
        auth_pb2.RevokeRequest(refresh_token=revoked_pair.refresh_token), timeout=CALL_TIMEOUT
    )
    assert revoke.revoked_sessions == 1
    now = _now(clock)
    await assert_family_invariants(server.pool, now=now)  # the control: all is well

    pool = server.pool
    rotated_sid = uuid.UUID(rotated_pair.session_id)
    parent_hash = hash_token(rotated_pair.refresh_token)
    later = now + timedelta(days=1)

    async def problems() -> str:
        return "\n".join(await family_invariant_violations(pool, now=now))

    # a) A second unused token in a live session.
    extra = secrets.token_bytes(32)
    await pool.execute(
        """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
           VALUES ($1, $2, $3, $4)""",
        extra,
        rotated_sid,
        now,
        later,
    )
    with pytest.raises(AssertionError, match="has 2 unused refresh tokens"):
        await assert_family_invariants(pool, now=now)
    await pool.execute("DELETE FROM refresh_tokens WHERE token_hash = $1", extra)
    await assert_family_invariants(pool, now=now)

    # b) A used token whose child row is gone (the session is left with no current token).
    child_row = await pool.fetchrow(
        "SELECT * FROM refresh_tokens WHERE token_hash = $1", hash_token(child.refresh_token)
    )
    assert child_row is not None
    assert bytes(child_row["parent_hash"]) == parent_hash
    await pool.execute(
        "DELETE FROM refresh_tokens WHERE token_hash = $1", hash_token(child.refresh_token)
    )
    text = await problems()
    assert "child_missing=True" in text
    assert "has 0 unused refresh tokens" in text
    await pool.execute(
        """INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at)
           VALUES ($1, $2, $3, $4, $5)""",
        *[child_row[k] for k in ("token_hash", "session_id", "parent_hash")],
        child_row["issued_at"],
        child_row["expires_at"],
    )
    await assert_family_invariants(pool, now=now)

    # c) A token whose parent is not marked used (in a revoked session, so only this shows).
    orphan = secrets.token_bytes(32)
    await pool.execute(
        """INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at)
           VALUES ($1, $2, $3, $4, $5)""",
        orphan,
        uuid.UUID(revoked_pair.session_id),
        hash_token(revoked_pair.refresh_token),
        now,
        later,
    )
    with pytest.raises(AssertionError, match="its parent is not marked used"):
        await assert_family_invariants(pool, now=now)
    await pool.execute("DELETE FROM refresh_tokens WHERE token_hash = $1", orphan)
    await assert_family_invariants(pool, now=now)

    # d) Two children of one parent (the schema forbids it; drop the guard to prove the
    # checker would see it on its own).
    await pool.execute("ALTER TABLE refresh_tokens DROP CONSTRAINT refresh_tokens_parent_hash_key")
    twin = secrets.token_bytes(32)
    await pool.execute(
        """INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at)
           VALUES ($1, $2, $3, $4, $5)""",
        twin,
        rotated_sid,
        parent_hash,
        now,
        later,
    )
    text = await problems()
    assert "has 2 children (max 1)" in text
    assert "children=2" in text
    await pool.execute("DELETE FROM refresh_tokens WHERE token_hash = $1", twin)
    await assert_family_invariants(pool, now=now)


# 2. A connection cut while a rotation waits inside its transaction


async def _blocked_rotation_pid(
    watcher: asyncpg.Connection, task: asyncio.Task[Any], *, within: float
) -> int:
    """The pid of the server backend waiting on a lock in ROTATE_FRESH_TOKEN_SQL."""
    deadline = time.monotonic() + within
    while True:
        row = await watcher.fetchrow(
            """SELECT pid, query FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND wait_event_type = 'Lock'
                  AND ltrim(query, E' \\n\\t') LIKE 'WITH presented AS%'"""
        )
        if row is not None:
            # pg_stat_activity keeps the first track_activity_query_size bytes (1024).
            assert ROTATE_FRESH_TOKEN_SQL.strip().startswith(row["query"].strip())
            pid: int = row["pid"]
            return pid
        assert not task.done(), "the Refresh finished without waiting for the session lock"
        assert time.monotonic() < deadline, "the rotation never blocked on the session row"
        await asyncio.sleep(0.02)


async def test_connection_cut_mid_rotation_is_unavailable_and_the_token_still_works(
    server: LiveServer, database_url: str, clock: ManualClock
) -> None:
    await server.create_user("cut")
    pair = await server.login("cut")
    session_id = uuid.UUID(pair.session_id)
    locker = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)

    async def call_refresh() -> auth_pb2.RefreshResponse:
        return await _refresh(server, pair.refresh_token)

    task: asyncio.Task[auth_pb2.RefreshResponse] | None = None
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session_id)
        task = asyncio.create_task(call_refresh())
        pid = await _blocked_rotation_pid(watcher, task, within=10)
        assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
        await lock.rollback()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(task, timeout=CALL_TIMEOUT)
        assert_error(caught.value, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await locker.close()
        await watcher.close()

    # Nothing of the cut rotation was committed.
    assert await _token_rows(server.pool, pair.session_id) == 1
    await assert_family_invariants(server.pool, now=_now(clock))

    # The same token still works: the pool replaced the dead connection.
    child = (await _refresh(server, pair.refresh_token)).tokens
    assert child.session_id == pair.session_id
    assert child.refresh_token != pair.refresh_token
    assert (await _validate(server, child.access_token)).valid
    stored_parent = await server.pool.fetchval(
        "SELECT parent_hash FROM refresh_tokens WHERE token_hash = $1",
        hash_token(child.refresh_token),
    )
    assert bytes(stored_parent) == hash_token(pair.refresh_token)
    assert await _token_rows(server.pool, pair.session_id) == 2
    await assert_family_invariants(server.pool, now=_now(clock))


# 3. PostgreSQL stopped and started again under a running server


@pytest.mark.system  # its own PostgreSQL, stopped and restarted
async def test_postgres_stopped_and_restarted_under_the_server(
    throwaway_pg_dir: Path, tmp_path: Path, clock: ManualClock
) -> None:
    pg_dir = throwaway_pg_dir
    uri = await start_migrated(pg_dir)
    running = True
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=uri,
        data_dir=tmp_path / "data",
        kek=TEST_KEK,
        db_timeout=2.0,
        # The safety-net poll stays out of the way: revocations must come by the listener.
        revocation_poll_interval=60.0,
    )
    live = await start_live_server(settings, clock)
    others: list[LiveServer] = []
    try:
        await live.create_user("stella")
        pair = await live.login("stella")
        assert (await _validate(live, pair.access_token)).valid
        feed = live.running.revocation_feed
        await asyncio.wait_for(feed.listening.wait(), timeout=5)
        socket_dir = await asyncio.to_thread(socket_dir_of, pg_dir)

        await asyncio.to_thread(stop_embedded_postgres, pg_dir)
        running = False

        # Validate answers from memory, at once.
        started = time.monotonic()
        verdict = await _validate(live, pair.access_token)
        assert verdict.valid
        assert verdict.session_id == pair.session_id
        assert time.monotonic() - started < 1.0

        # Calls that need the database say so, within db_timeout + 2 s.
        limit = settings.db_timeout + 2.0
        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("Issue", lambda: _issue(live, "stella")),
            ("Refresh", lambda: _refresh(live, pair.refresh_token)),
        ]
        for what, make_call in calls:
            started = time.monotonic()
            await _fails_with(make_call(), Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            elapsed = time.monotonic() - started
            assert elapsed < limit, f"{what} took {elapsed:.1f}s to report the outage"

        await asyncio.to_thread(start_embedded_postgres, pg_dir, socket_dir)
        running = True
        assert await asyncio.to_thread(socket_dir_of, pg_dir) == socket_dir
        restarted = time.monotonic()

        # Without restarting the server, logins and refreshes work again within 5 s.
        issued = (
            await _succeeds_within(lambda: _issue(live, "stella"), within=5, what="Issue")
        ).tokens
        remaining = max(0.1, 5 - (time.monotonic() - restarted))
        child = (
            await _succeeds_within(
                lambda: _refresh(live, pair.refresh_token), within=remaining, what="Refresh"
            )
        ).tokens
        assert child.session_id == pair.session_id
        assert (await _validate(live, child.access_token)).valid
        assert (await _validate(live, issued.access_token)).valid

        # The revocation listener reconnects by itself...
        remaining = max(0.1, 5 - (time.monotonic() - restarted))
        await asyncio.wait_for(feed.listening.wait(), timeout=remaining)
        assert feed.reconnects >= 1

        # ...so a Revoke made elsewhere after recovery reaches this server's Validate.
        other = await start_live_server(settings, clock)
        others.append(other)
        revoked = await other.stub.Revoke(
            auth_pb2.RevokeRequest(access_token=issued.access_token), timeout=CALL_TIMEOUT
        )
        assert revoked.revoked_sessions == 1

        async def revoked_here() -> bool:
            verdict = await _validate(live, issued.access_token)
            return verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED

        await _until(revoked_here, within=2.0, what="revocation after recovery")
        # The other session is untouched.
        assert (await _validate(live, child.access_token)).valid

        await assert_family_invariants(live.pool, now=_now(clock))
        assert await _token_rows(live.pool, pair.session_id) == 2
    finally:
        for other in others:
            await stop_live_server(other)
        await stop_live_server(live)
        if running:
            with contextlib.suppress(subprocess.CalledProcessError):
                await asyncio.to_thread(stop_embedded_postgres, pg_dir)


# 4. Revocations made while a replica's listener is down are not lost


async def _listener_pids(conn: asyncpg.Connection) -> set[int]:
    rows = await conn.fetch(
        """SELECT pid FROM pg_stat_activity
            WHERE application_name = $1 AND datname = current_database()""",
        LISTENER_APPLICATION_NAME,
    )
    return {r["pid"] for r in rows}


async def _two_servers(
    server_factory: ServerFactory, admin: asyncpg.Connection
) -> tuple[LiveServer, LiveServer, int]:
    """Two in-process servers on one database; and the pid of the second's listener."""
    # The safety-net poll stays out of the way: only the listener (and its resync) count.
    first = await server_factory(revocation_poll_interval=60.0)
    await asyncio.wait_for(first.running.revocation_feed.listening.wait(), timeout=5)
    before = await _listener_pids(admin)
    second = await server_factory(revocation_poll_interval=60.0)
    await asyncio.wait_for(second.running.revocation_feed.listening.wait(), timeout=5)
    new = await _listener_pids(admin) - before
    assert len(new) == 1, new
    return first, second, new.pop()


async def test_revocation_while_the_listener_reconnects_is_not_lost(
    server_factory: ServerFactory, database_url: str, clock: ManualClock
) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        first, second, pid = await _two_servers(server_factory, admin)
        await first.create_user("lena")
        pair = await first.login("lena")
        kept = await first.login("lena")
        assert (await _validate(second, pair.access_token)).valid
        feed = second.running.revocation_feed
        reconnects = feed.reconnects

        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        revoked = await first.stub.Revoke(
            auth_pb2.RevokeRequest(access_token=pair.access_token), timeout=CALL_TIMEOUT
        )
        assert revoked.revoked_sessions == 1

        async def revoked_on_second() -> bool:
            verdict = await _validate(second, pair.access_token)
            return verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED

        await _until(revoked_on_second, within=2.0, what="revocation on the second server")
        assert (await _validate(second, kept.access_token)).valid

        # The second server's listener really was cut, and is back on a new connection.
        async def relistening() -> bool:
            return feed.listening.is_set() and feed.reconnects > reconnects

        await _until(relistening, within=5.0, what="listener reconnect")
        pids = await _listener_pids(admin)
        assert pid not in pids
        assert len(pids) == 2
        await assert_family_invariants(first.pool, now=_now(clock))
    finally:
        await admin.close()


async def test_revocation_while_the_listener_is_held_down_is_seen_on_reconnect(
    server_factory: ServerFactory,
    database_url: str,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the listener cannot reconnect until the revocation has committed: only
    the log read while it is down or its resync on reconnect (not NOTIFY, not the 60 s
    poll) can bring the news."""
    admin = await asyncpg.connect(database_url)
    try:
        first, second, pid = await _two_servers(server_factory, admin)
        await first.create_user("mira")
        pair = await first.login("mira")
        assert (await _validate(second, pair.access_token)).valid
        feed = second.running.revocation_feed

        real_connect = asyncpg.connect  # what the listener calls
        gate_open = True
        refused = 0

        async def gated_connect(*args: Any, **kwargs: Any) -> Any:
            nonlocal refused
            settings = kwargs.get("server_settings") or {}
            if not gate_open and settings.get("application_name") == LISTENER_APPLICATION_NAME:
                refused += 1
                raise ConnectionRefusedError("listener held down by the test")
            return await real_connect(*args, **kwargs)

        monkeypatch.setattr(asyncpg, "connect", gated_connect)
        gate_open = False
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

        async def tried_and_refused() -> bool:
            return refused >= 1

        await _until(tried_and_refused, within=5.0, what="a refused listener reconnect")
        assert not feed.listening.is_set()

        revoked = await first.stub.Revoke(
            auth_pb2.RevokeRequest(access_token=pair.access_token), timeout=CALL_TIMEOUT
        )
        assert revoked.revoked_sessions == 1
        assert not feed.listening.is_set()  # the revocation committed while it was down

        gate_open = True

        async def revoked_on_second() -> bool:
            verdict = await _validate(second, pair.access_token)
            return verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED

        await _until(revoked_on_second, within=2.0, what="revocation after the listener returns")
        await asyncio.wait_for(feed.listening.wait(), timeout=5)
        assert pid not in await _listener_pids(admin)
        await assert_family_invariants(first.pool, now=_now(clock))
    finally:
        await admin.close()


# A server that refuses writes (a standby, or one made read-only): UNAVAILABLE, connection dropped


async def test_a_write_refused_as_read_only_is_unavailable_and_its_connection_is_replaced(
    server_factory: ServerFactory, database_url: str
) -> None:
    server = await server_factory(db_pool_size=2)
    await server.create_user("readonly")
    pair = (await _issue(server, "readonly")).tokens
    admin = await asyncpg.connect(database_url)
    try:
        # New sessions of this database refuse writes, as a hot standby's do; the pool's
        # connections are cut so that it reconnects into such sessions.
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        for _ in range(4):  # cut connections, then ones that refuse the write
            await _fails_with(
                _refresh(server, pair.refresh_token), Code.UNAVAILABLE, "DATABASE_UNAVAILABLE"
            )
        await _fails_with(_issue(server, "readonly"), Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        # The server accepts writes again: a connection that met it read-only was not kept
        # (a session keeps the default it started with), so the token rotates.
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        child = await _succeeds_within(
            lambda: _refresh(server, pair.refresh_token), within=5.0, what="a writable connection"
        )
        assert child.tokens.session_id == pair.session_id
    finally:
        await admin.close()
