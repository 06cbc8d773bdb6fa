"""The bench's SQL baseline for Refresh: a rotation in its cheapest SQL form, run by the load
generator's own processes through asyncpg alone (`service.loadtest.runner`, scenario
`sql-rotation`). It is written here, not taken from `service.store`: it is the floor the
service's own SQL is measured against, whatever that SQL becomes.

One statement, one round trip: lock the presented token and check that it is unused and
unexpired (the UPDATE's WHERE, re-checked by PostgreSQL after any wait for the row lock),
mark it used, touch its session, insert the child.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

ROTATE_IN_ONE_STATEMENT_SQL = """
WITH parent AS (
    UPDATE refresh_tokens SET used_at = $2, child_hash = $3
     WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2
    RETURNING session_id),
session AS (
    UPDATE sessions SET last_refreshed_at = $2, last_refreshed_peer = $5,
                        access_expires_max = greatest(access_expires_max, $4),
                        purge_after = greatest(access_expires_max, $4, least(expires_at, $4))
     WHERE id = (SELECT session_id FROM parent) AND revoked_at IS NULL
    RETURNING id)
INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at)
SELECT $3, id, $1, $2, $4 FROM session
RETURNING session_id
"""

_PEER = "ipv4:127.0.0.1:50000"  # the rotating peer, as the service stores it


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing: these connections hold no session state (asyncpg still rolls back an
    open transaction before this is called)."""


class RotationRefused(Exception):
    """The statement rotated nothing (the chain broke): counted as an error."""


class SqlRotations:
    """One load process's chains: a user, `chains` sessions, each with its unused token."""

    def __init__(self, dsn: str, *, chains: int, pool_size: int) -> None:
        self._dsn = dsn
        self._chains = chains
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._free: list[bytes] = []

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._pool_size,
            max_size=self._pool_size,
            # asyncpg's default reset sends a query on every release: a second round trip.
            reset=_no_reset,
        )
        assert self._pool is not None
        now = datetime.now(UTC)
        far = now + timedelta(days=1)
        user_id = uuid.uuid4()
        async with self._pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO users (id, username, username_key, password_hash, created_at,
                                      updated_at)
                   VALUES ($1, $2, $2, 'x', $3, $3)""",
                user_id,
                f"bench-sql-{user_id.hex[:12]}",
                now,
            )
            for _ in range(self._chains):
                session_id, token_hash = uuid.uuid4(), secrets.token_bytes(32)
                await conn.execute(
                    """INSERT INTO sessions (id, user_id, scopes, audience, created_at,
                                             expires_at, access_expires_max)
                       VALUES ($1, $2, '{}', 'bench', $3, $4, $4)""",
                    session_id,
                    user_id,
                    now,
                    far,
                )
                await conn.execute(
                    """INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
                       VALUES ($1, $2, $3, $4)""",
                    token_hash,
                    session_id,
                    now,
                    far,
                )
                self._free.append(token_hash)

    async def rotate(self) -> None:
        """One rotation of a free chain (each virtual client holds one while it rotates)."""
        assert self._pool is not None
        token_hash = self._free.pop()
        child = hashlib.sha256(token_hash).digest()
        now = datetime.now(UTC)
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    ROTATE_IN_ONE_STATEMENT_SQL,
                    token_hash,
                    now,
                    child,
                    now + timedelta(days=1),
                    _PEER,
                )
            if row is None:
                raise RotationRefused("ROTATION_REFUSED")
            token_hash = child
        finally:
            self._free.append(token_hash)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
