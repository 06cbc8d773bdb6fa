"""Signing keys (their private halves sealed under the KEK) and the server's other
sealed secrets; every key change appended to the revocation log (which replicas follow)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

from service.domain.records import SecurityEvent, SigningKeyRecord
from service.store.events import EventWriter
from service.store.revocations import log_keys_changed


class PostgresSigningKeys(EventWriter):
    """The `signing_keys` and `server_secrets` tables."""

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored key, retired ones included, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT * FROM signing_keys ORDER BY created_at, kid")
        return [
            SigningKeyRecord(
                kid=r["kid"],
                alg=r["alg"],
                public_jwk=json.loads(r["public_jwk"]),
                private_key_sealed=(
                    None if r["private_key_sealed"] is None else bytes(r["private_key_sealed"])
                ),
                created_at=r["created_at"],
                activates_at=r["activates_at"],
                retired_at=r["retired_at"],
            )
            for r in rows
        ]

    async def signing_key_versions(self) -> list[tuple[str, bool]]:
        """(kid, retired) of every key: what a replica compares to see whether to reload."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT kid, retired_at IS NOT NULL AS retired FROM signing_keys ORDER BY kid"
            )
        return [(r["kid"], r["retired"]) for r in rows]

    async def insert_signing_key(self, key: SigningKeyRecord, event: SecurityEvent) -> None:
        """Store a new key, record why, and tell every replica (on commit)."""
        async with self._transaction() as conn:
            await conn.execute(
                """INSERT INTO signing_keys
                          (kid, alg, public_jwk, private_key_sealed, created_at, activates_at)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                key.kid,
                key.alg,
                json.dumps(key.public_jwk),
                key.private_key_sealed,
                key.created_at,
                key.activates_at,
            )
            await self._insert_event(conn, event, key.created_at)
            await log_keys_changed(conn, key.created_at)

    async def retire_signing_keys(
        self, kids: list[str], *, now: datetime, event: SecurityEvent
    ) -> list[str]:
        """Retire keys (wiping their private halves); the kids this call retired."""
        async with self._transaction() as conn:
            rows = await conn.fetch(
                """UPDATE signing_keys SET retired_at = $2, private_key_sealed = NULL
                    WHERE kid = ANY($1::text[]) AND retired_at IS NULL RETURNING kid""",
                kids,
                now,
            )
            retired = sorted(r["kid"] for r in rows)
            if retired:
                await self._insert_event(
                    conn,
                    replace(event, detail={**(event.detail or {}), "kids": ",".join(retired)}),
                    now,
                )
                await log_keys_changed(conn, now)
        return retired

    async def server_secret(self, name: str) -> bytes | None:
        async with self._connection() as conn:
            value = await conn.fetchval("SELECT sealed FROM server_secrets WHERE name = $1", name)
        return None if value is None else bytes(value)

    async def insert_server_secret(self, name: str, sealed: bytes, *, now: datetime) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO server_secrets (name, sealed, created_at) VALUES ($1, $2, $3)",
                name,
                sealed,
                now,
            )
