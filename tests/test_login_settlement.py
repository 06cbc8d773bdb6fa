"""A login's throttle reservation is settled by its session's statement (`start_session`,
migration 0015), in one transaction with the session: the counts it leaves are those the
separate settlement left, a right password is a success even if the user changed during
the hash, nothing is settled with the throttle off, the reservation locks its keys' rows
without writing them, and logins racing changes of their user never deadlock."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from service.clock import to_datetime
from service.domain.records import CallerInfo, SecurityEvent
from service.domain.throttle import peer_key, user_key
from tests.helpers import error_info, login_reason
from tests.live_server import PASSWORD, LiveServer, ServerFactory

WRONG = "not the password"
PEER = "ipv4:127.0.0.1:1"  # how the live server's client appears to the throttle
NOBODY_WAITS = 10**6


async def _counts(server: LiveServer) -> dict[str, tuple[object, ...]]:
    """Each key's (failures, last failure, wait, pending)."""
    rows = await server.pool.fetch(
        "SELECT key, failures, last_failure_at, locked_until, pending FROM login_throttle"
    )
    return {r["key"]: tuple(r.values())[1:] for r in rows}


async def test_a_failed_then_successful_login_leaves_the_counts_the_settlement_left(
    server_factory: ServerFactory,
) -> None:
    """A failure, then the right password: the username's count is cleared, the address
    keeps the failure (and its time) and takes the success's reservation back; nothing is
    pending. (The counts the settlement of its own round trip left.)"""
    server = await server_factory(throttle_user_failures=5, throttle_peer_failures=100)
    await server.create_user("settled")
    failed_at = to_datetime(server.clock.now())
    assert await login_reason(server, "settled", WRONG) == "INVALID_CREDENTIALS"
    server.clock.advance(2)
    assert await login_reason(server, "settled", PASSWORD) == "OK"
    assert await _counts(server) == {
        user_key("settled"): (0, failed_at, None, 0),
        peer_key(PEER): (1, failed_at, None, 0),
    }


async def test_a_logins_settlement_commits_with_its_session(server: LiveServer) -> None:
    """The settlement is part of the session's transaction: when the session's statement
    fails (here an injected error on its login event), neither is written, and the attempt
    stays counted (pending until PENDING_EXPIRY, as an attempt whose check never ended);
    before, the settlement had committed on its own."""
    await server.create_user("atomic")
    async with server.pool.acquire() as conn:
        await conn.execute(
            """CREATE FUNCTION refuse_login_event() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
               CREATE TRIGGER refuse_login_event BEFORE INSERT ON security_events
               FOR EACH ROW WHEN (NEW.kind = 'login_succeeded')
               EXECUTE FUNCTION refuse_login_event();"""
        )
    tokens = server.running.components.tokens
    with pytest.raises(asyncpg.RaiseError):
        await tokens.issue(
            username="atomic", password=PASSWORD, scopes=(), audience=None, caller=CallerInfo(PEER)
        )
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0
    pending = dict(await server.pool.fetch("SELECT key, pending FROM login_throttle"))
    assert pending == {user_key("atomic"): 1, peer_key(PEER): 1}


async def test_a_password_right_when_checked_is_a_success_even_if_the_user_changed_meanwhile(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password changes while the login's hash is being checked: the login starts no
    session (INVALID_CREDENTIALS), but the password it checked was right, so for the
    throttle it is a success, as when the settlement went before the session: the
    username's earlier failure is cleared, not joined by another."""
    server = await server_factory(throttle_user_failures=5, throttle_peer_failures=100)
    await server.create_user("moving")
    assert await login_reason(server, "moving", WRONG) == "INVALID_CREDENTIALS"
    components = server.running.components
    verify = components.hasher.verify
    changed: list[bool] = []

    async def verify_then_change(password_hash: str | None, password: str) -> bool:
        matches = await verify(password_hash, password)
        if matches and not changed:
            changed.append(True)
            await components.users.set_password("moving", "a password set meanwhile")
        return matches

    monkeypatch.setattr(components.hasher, "verify", verify_then_change)
    assert await login_reason(server, "moving", PASSWORD) == "INVALID_CREDENTIALS"
    assert changed == [True]
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 0
    counts = await _counts(server)
    assert counts[user_key("moving")][0::3] == (0, 0)  # failures cleared, nothing pending
    assert counts[peer_key(PEER)][0::3] == (1, 0)  # the one wrong password, nothing pending


async def test_without_the_throttle_a_login_reserves_and_settles_nothing(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(login_throttle=False)
    await server.create_user("unthrottled")
    assert await login_reason(server, "unthrottled", WRONG) == "INVALID_CREDENTIALS"
    assert await login_reason(server, "unthrottled", PASSWORD) == "OK"
    assert await server.pool.fetchval("SELECT count(*) FROM sessions") == 1
    assert await _counts(server) == {}


async def test_the_reservation_locks_its_keys_rows_without_writing_them(
    server_factory: ServerFactory,
) -> None:
    """Row versions written per key (counted by a trigger on updates): a successful login
    writes two (the reservation's count, the settlement), where it wrote three (the rows
    were rewritten unchanged only to lock them); an attempt refused while a key waits
    writes none, where it wrote one."""
    server = await server_factory(throttle_user_failures=1, throttle_peer_failures=100)
    await server.create_user("versions")
    assert await login_reason(server, "versions", PASSWORD) == "OK"  # the rows exist
    async with server.pool.acquire() as conn:
        await conn.execute(
            """CREATE TABLE throttle_versions (key text NOT NULL);
               CREATE FUNCTION count_throttle_version() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO throttle_versions VALUES (NEW.key); RETURN NEW; END $$;
               CREATE TRIGGER count_throttle_version AFTER UPDATE ON login_throttle
               FOR EACH ROW EXECUTE FUNCTION count_throttle_version();"""
        )

    async def versions_written() -> dict[str, int]:
        rows = await server.pool.fetch("SELECT key, count(*) FROM throttle_versions GROUP BY key")
        await server.pool.execute("DELETE FROM throttle_versions")
        return dict(rows)

    assert await login_reason(server, "versions", PASSWORD) == "OK"
    assert await versions_written() == {user_key("versions"): 2, peer_key(PEER): 2}
    for _ in range(2):  # the second failure over the allowance of one makes the name wait
        assert await login_reason(server, "versions", WRONG) == "INVALID_CREDENTIALS"
    await versions_written()
    assert await login_reason(server, "versions", PASSWORD) == "LOGIN_THROTTLED"
    assert await versions_written() == {}


async def test_logins_racing_changes_of_their_user_never_deadlock(
    server_factory: ServerFactory,
) -> None:
    """Logins of one user through one address (the session's statement locks the user's
    row, then the keys' rows) while the user is disabled and enabled, gets a new password
    hash and is logged out everywhere (each locks the user's row): every call ends, with
    a session or INVALID_CREDENTIALS (never a deadlock's error), and every reservation is
    settled."""
    server = await server_factory(
        throttle_user_failures=NOBODY_WAITS, throttle_peer_failures=NOBODY_WAITS, db_pool_size=8
    )
    user = await server.create_user("contested")
    users = server.running.components.users
    store = server.running.components.store

    async def change(round_: int) -> None:
        for _ in range(round_):
            await users.set_disabled("contested", True)
            await users.set_disabled("contested", False)
            await users.set_password("contested", PASSWORD)  # a new hash (a new salt)
            await store.revoke_user_sessions(
                user.id,
                reason="logout_everywhere",
                now=to_datetime(server.clock.now()),
                event=SecurityEvent(kind="sessions_revoked", subject=str(user.id)),
            )

    async def logins() -> list[str]:
        return await asyncio.gather(
            *(login_reason(server, "contested", PASSWORD) for _ in range(24))
        )

    # A liveness bound: a deadlock would be broken by PostgreSQL after deadlock_timeout
    # with an error, which the reasons below would show.
    reasons, _ = await asyncio.wait_for(asyncio.gather(logins(), change(4)), timeout=120)
    assert len(reasons) == 24
    assert set(reasons) <= {"OK", "INVALID_CREDENTIALS"}, reasons
    pending = dict(await server.pool.fetch("SELECT key, pending FROM login_throttle"))
    assert pending == {user_key("contested"): 0, peer_key(PEER): 0}


async def test_a_right_password_refused_a_scope_is_settled_as_a_success(
    server_factory: ServerFactory,
) -> None:
    """A right password asking for a scope the user lacks starts no session (so no session
    statement carries its settlement): it is settled on its own, nothing left pending or
    counted."""
    server = await server_factory(throttle_user_failures=5, throttle_peer_failures=100)
    await server.create_user("modest", scopes=("read",))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.login("modest", scopes=("admin",))
    assert error_info(caught.value).reason == "SCOPE_NOT_ALLOWED"
    counts = await _counts(server)
    assert {key: (c[0], c[3]) for key, c in counts.items()} == {
        user_key("modest"): (0, 0),
        peer_key(PEER): (0, 0),
    }
