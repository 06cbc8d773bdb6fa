"""A session's stored refresh tokens are bounded (migration 0017): a client that holds a
session and rotates it in a loop cannot grow `refresh_tokens` by one row a refresh for the
session's whole life. The session keeps its REFRESH_TOKENS_KEPT newest tokens and at most
REFRESH_TOKEN_PRUNE_STEP more; a token older than that is unknown when presented again
(REFRESH_TOKEN_INVALID, nothing revoked), while reuse of any token kept still revokes the
session. Both statements that rotate (the one-statement fresh path and the transaction's
ROTATE_SQL) number the child and prune."""

from __future__ import annotations

import uuid
from datetime import timedelta

from authsvc_client.gen.auth.v1 import auth_pb2

from service.clock import to_datetime
from service.domain.refresh_tokens import Rotate, derive_child_token, hash_token
from service.store.invariants import family_invariant_violations
from service.store.refresh_tokens import (
    REFRESH_TOKEN_PRUNE_STEP,
    REFRESH_TOKENS_KEPT,
    PostgresRefreshTokens,
)
from tests.helpers import refresh, refresh_fails, validate
from tests.live_server import LiveServer, ServerFactory

KEPT, STEP = REFRESH_TOKENS_KEPT, REFRESH_TOKEN_PRUNE_STEP


async def _rotations(server: LiveServer, session_id: str) -> list[int]:
    rows = await server.pool.fetch(
        "SELECT rotation FROM refresh_tokens WHERE session_id = $1 ORDER BY rotation",
        uuid.UUID(session_id),
    )
    return [row["rotation"] for row in rows]


async def test_a_session_rotated_in_a_loop_keeps_a_bounded_history(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(refresh_reuse_grace=0)
    await server.create_user("alice", scopes=("read",))
    first = await server.login("alice")
    tokens = [first.refresh_token]
    rotations = KEPT + STEP + 1
    for _ in range(rotations):
        tokens.append((await refresh(server, tokens[-1])).refresh_token)

    # Pruned at the children numbered KEPT and KEPT + STEP: what is left is the KEPT tokens
    # after the last cut, and the one rotation since.
    kept = await _rotations(server, first.session_id)
    assert kept == list(range(rotations - KEPT, rotations + 1))
    assert len(kept) <= KEPT + STEP
    async with server.pool.acquire() as conn:
        assert await family_invariant_violations(conn) == []

    # A pruned token is unknown: refused, and the session lives on.
    await refresh_fails(server, tokens[0], "REFRESH_TOKEN_INVALID")
    await refresh_fails(server, tokens[rotations - KEPT - 1], "REFRESH_TOKEN_INVALID")
    newest = await refresh(server, tokens[-1])
    assert (await validate(server, newest.access_token)).valid

    # The oldest token kept is reuse: the whole session is revoked.
    await refresh_fails(server, tokens[rotations - KEPT], "REFRESH_TOKEN_REUSED")
    verdict = await validate(server, newest.access_token)
    assert not verdict.valid
    assert verdict.error == auth_pb2.VALIDATION_ERROR_REVOKED
    await refresh_fails(server, newest.refresh_token, "SESSION_REVOKED")


async def _session_near_a_cut(server: LiveServer) -> tuple[str, str]:
    """A session whose current token is numbered KEPT + STEP - 1, with two older used tokens
    stored beside it, numbered STEP (the next cut's last) and STEP + 1 (kept): its session
    id and current token."""
    await server.create_user("bob", scopes=("read",))
    pair = await server.login("bob")
    session = uuid.UUID(pair.session_id)
    async with server.pool.acquire() as conn:
        await conn.execute(
            "UPDATE refresh_tokens SET rotation = $2 WHERE token_hash = $1",
            hash_token(pair.refresh_token),
            KEPT + STEP - 1,
        )
        for rotation in (STEP, STEP + 1):
            await conn.execute(
                """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at,
                                               used_at, child_hash, rotation)
                   VALUES ($1, $2, now(), now() + interval '1 day', now(), $3, $4)""",
                uuid.uuid4().bytes * 2,
                session,
                uuid.uuid4().bytes * 2,
                rotation,
            )
    return pair.session_id, pair.refresh_token


async def test_the_fresh_rotation_statement_numbers_the_child_and_prunes(
    server: LiveServer,
) -> None:
    session_id, token = await _session_near_a_cut(server)
    await refresh(server, token)
    assert await _rotations(server, session_id) == [STEP + 1, KEPT + STEP - 1, KEPT + STEP]


async def test_the_transaction_rotation_numbers_the_child_and_prunes(server: LiveServer) -> None:
    session_id, token = await _session_near_a_cut(server)
    store = PostgresRefreshTokens(server.pool, timeout=10)
    now = to_datetime(server.clock.now())
    child = derive_child_token(token, b"k" * 32)
    async with store.refreshing() as refreshing:
        state = await refreshing.lock(hash_token(token))
        assert state is not None
        assert await refreshing.rotate(
            state,
            Rotate(child_hash=hash_token(child), child_expires_at=now + timedelta(days=1)),
            now=now,
            access_expires_at=now + timedelta(minutes=15),
            peer=None,
            user_bound=now + timedelta(minutes=16),
        )
    assert await _rotations(server, session_id) == [STEP + 1, KEPT + STEP - 1, KEPT + STEP]


async def test_rotations_between_cuts_delete_nothing(server: LiveServer) -> None:
    await server.create_user("carol", scopes=("read",))
    pair = await server.login("carol")
    token = pair.refresh_token
    for _ in range(3):
        token = (await refresh(server, token)).refresh_token
    assert await _rotations(server, pair.session_id) == [0, 1, 2, 3]
