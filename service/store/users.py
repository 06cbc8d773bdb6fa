"""Users: their accounts, and changes that end every session of theirs."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from service.domain.records import SecurityEvent, UserRecord
from service.domain.revocation import UserRevocation
from service.errors import UserAlreadyExists
from service.store.events import EventWriter
from service.store.revocations import revoke_user_sessions


def user_record(row: asyncpg.Record, *, prefix: str = "") -> UserRecord:
    """A `users` row (its columns named with `prefix` when read beside another table's)."""
    return UserRecord(
        id=row[prefix + "id"],
        username=row[prefix + "username"],
        password_hash=row[prefix + "password_hash"],
        scopes=tuple(row[prefix + "scopes"]),
        disabled=row[prefix + "disabled"],
        created_at=row[prefix + "created_at"],
    )


class PostgresUsers(EventWriter):
    """The `users` table."""

    async def create_user(
        self,
        *,
        user_id: uuid.UUID,
        username: str,
        username_key: str,
        password_hash: str,
        scopes: tuple[str, ...],
        now: datetime,
    ) -> UserRecord:
        """A new user; UserAlreadyExists if a live user has the same `username_key`."""
        try:
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    """INSERT INTO users (id, username, username_key, password_hash, scopes,
                                          created_at, updated_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING *""",
                    user_id,
                    username,
                    username_key,
                    password_hash,
                    list(scopes),
                    now,
                )
        except asyncpg.UniqueViolationError:
            raise UserAlreadyExists() from None
        assert row is not None
        return user_record(row)

    async def find_user(self, username_key: str) -> UserRecord | None:
        """The live user whose username has this canonical key."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM users WHERE username_key = $1 AND deleted_at IS NULL", username_key
            )
        return None if row is None else user_record(row)

    async def find_user_by_id(self, user_id: uuid.UUID) -> UserRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM users WHERE id = $1 AND deleted_at IS NULL", user_id
            )
        return None if row is None else user_record(row)

    async def has_live_users(self) -> bool:
        """Whether any user (not deleted) exists: the banner's first-user hint is for
        an empty database only."""
        async with self._connection() as conn:
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM users WHERE deleted_at IS NULL)"
            )
        return bool(found)

    async def list_users(self) -> list[UserRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM users WHERE deleted_at IS NULL ORDER BY username"
            )
        return [user_record(r) for r in rows]

    async def set_password_hash(
        self,
        user_id: uuid.UUID,
        password_hash: str,
        *,
        now: datetime,
        replacing: str | None = None,
    ) -> None:
        """Store a new hash; with `replacing`, only if the stored hash is still that one
        (a rehash must never undo a password change that happened meanwhile)."""
        async with self._connection() as conn:
            await conn.execute(
                """UPDATE users SET password_hash = $2, updated_at = $3
                    WHERE id = $1 AND deleted_at IS NULL
                      AND ($4::text IS NULL OR password_hash = $4)""",
                user_id,
                password_hash,
                now,
                replacing,
            )

    async def change_user(
        self,
        user_id: uuid.UUID,
        *,
        now: datetime,
        password_hash: str | None = None,
        disabled: bool | None = None,
        revoke_reason: str | None = None,
        events: list[SecurityEvent],
    ) -> tuple[UserRevocation | None, int] | None:
        """One transaction: set a new password hash and/or the disabled flag, revoke every
        session if `revoke_reason` is given (appended to the revocation log), and record the events.
        All of it or none: a change cut short can never leave the old sessions alive.
        The user's revocation (None without `revoke_reason`) and how many sessions it
        revoked, or None if there is no such user."""
        async with self._transaction() as conn:
            found = await conn.fetchval(
                """UPDATE users SET password_hash = coalesce($2, password_hash),
                                    disabled = coalesce($3, disabled), updated_at = $4
                    WHERE id = $1 AND deleted_at IS NULL RETURNING id""",
                user_id,
                password_hash,
                disabled,
                now,
            )
            if found is None:
                return None
            revoked: tuple[UserRevocation | None, int] = (
                (None, 0)
                if revoke_reason is None
                else await revoke_user_sessions(conn, user_id, revoke_reason, now)
            )
            for event in events:
                await self._insert_event(conn, event, now)
        return revoked

    async def delete_user(
        self, user_id: uuid.UUID, *, now: datetime, event: SecurityEvent
    ) -> tuple[UserRevocation, int] | None:
        """Mark a user deleted (disabled, no password, username free) and revoke their
        sessions, in one transaction; the revocation and how many sessions it revoked, or
        None if there was no such user.
        The janitor deletes the row once their sessions are gone."""
        async with self._transaction() as conn:
            found = await conn.fetchval(
                """UPDATE users SET deleted_at = $2, disabled = true, password_hash = '!',
                                    scopes = '{}', updated_at = $2
                    WHERE id = $1 AND deleted_at IS NULL RETURNING id""",
                user_id,
                now,
            )
            if found is None:
                return None
            revoked = await revoke_user_sessions(conn, user_id, "user_deleted", now)
            await self._insert_event(conn, event, now)
        return revoked
