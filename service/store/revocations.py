"""Revoking sessions: one session, or every session of a user at once (one row, the
user's generation raised). Shared by the parts whose transactions revoke (a logout, a
user's change or deletion, reuse detection, the session cap). Each revocation returns
what every replica needs to remember it, and for how long, and appends it to the
revocation log in the same transaction (migration 0011: its sequence and NOTIFY come at
commit), which is how every other replica and watcher hears of it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from service.domain.revocation import REMEMBER_PAST_BOUND_SECONDS, Revocation, UserRevocation
from service.settings import MAX_SESSIONS_PER_USER

# What a revocation of all a user's sessions reports as revoked is counted up to this many
# (the largest AUTH_MAX_SESSIONS_PER_USER): the count reads a bounded range of the index.
REVOKED_COUNT_LIMIT = MAX_SESSIONS_PER_USER

# When a session may be deleted, computed from its rows: the later of its access-token
# bound and the moment it died (the earliest of its absolute expiry, its revocation and
# the expiry of its unused refresh token; with no unused token, it is dead already).
# Stored as `sessions.purge_after` by every write that changes one of these (the cheap
# forms are in migration 0012 (start_session), ROTATE_SQL, RAISE_ACCESS_EXPIRES_MAX_SQL and
# PURGE_AFTER_ON_REVOKE; a rotation stores it up to a step later: stepped_purge_after); the
# janitor's re-check and back-fill use this exact form.
SESSION_PURGE_AFTER = """greatest(s.access_expires_max, least(s.expires_at, s.revoked_at,
    coalesce((SELECT max(t.expires_at) FROM refresh_tokens t
               WHERE t.session_id = s.id AND t.used_at IS NULL), '-infinity'::timestamptz)))"""


# A rotation moves a session's purge time (its new refresh token expires later): stored
# exactly, `purge_after` (indexed: sessions_purge_after) would change on every refresh, so
# no refresh could be a HOT update and each would add an entry to every index of sessions.
# It is stored up to this much later than exact instead, and left as it is while it stays
# within that step: most refreshes write no indexed column. Later is safe (the janitor
# deletes a session only once the rows themselves say so); it only keeps a dead session
# up to this much longer.
PURGE_AFTER_STEP_SECONDS = 3600


def stepped_purge_after(exact: str, latest: str) -> str:
    """The `purge_after` a rotation stores: as it is while in [exact, exact + step],
    else `exact` + step, but never past `latest` (what it can be at most: the later of
    the session's bound and its absolute expiry). `exact` and `latest` are SQL
    expressions; NULL (not computed yet) is computed."""
    step = f"interval '{PURGE_AFTER_STEP_SECONDS} seconds'"
    return f"""CASE WHEN purge_after BETWEEN {exact} AND {exact} + {step} THEN purge_after
                        ELSE least({exact} + {step}, {latest}) END"""


def purge_after_on_revoke(at: str) -> str:
    """The new `purge_after` of a session revoked at `at` (a statement parameter): it dies
    then, if it had not died before: greatest(aem, least(died, at)) =
    least(greatest(aem, died), greatest(aem, at)). NULL (not computed yet) stays NULL for
    the janitor's back-fill."""
    return f"""CASE WHEN purge_after IS NOT NULL
    THEN least(purge_after, greatest(access_expires_max, {at})) END"""


PURGE_AFTER_ON_REVOKE = purge_after_on_revoke("$2")

# Revoking (at $2, reason $3) one session ($1). A session its user's generation revoked
# already is not revoked again (the janitor writes its revoked_at).
REVOKE_SESSION_SQL = f"""
UPDATE sessions SET revoked_at = $2, revoke_reason = $3, purge_after = {PURGE_AFTER_ON_REVOKE}
 WHERE id = $1 AND revoked_at IS NULL
   AND user_generation >= (SELECT session_generation FROM users WHERE users.id = sessions.user_id)
RETURNING id, revoked_at, access_expires_max"""  # noqa: S608 (constants only)


# A revocation of every session of a user: one row, whatever their number. The sessions of
# the generation it ends are counted (up to $4, through the index); the janitor writes
# their revoked_at later, in batches (`catch_up_user_revocations`).
REVOKE_USER_SESSIONS_SQL = """
UPDATE users SET session_generation = session_generation + 1,
                 sessions_revoked_at = $2, sessions_revoke_reason = $3,
                 revoked_sessions_until = access_expires_max,
                 sessions_revoke_pending = true
 WHERE id = $1
RETURNING session_generation, revoked_sessions_until,
          (SELECT count(*) FROM (
               SELECT 1 FROM sessions s
                WHERE s.user_id = $1 AND s.user_generation = users.session_generation - 1
                  AND s.revoked_at IS NULL
                LIMIT $4) c) AS sessions
"""


# The log's rows: each remembered until its bound plus the largest leeway and a margin
# (RevocationState's `remembered_until`).
_KEEP = f"make_interval(secs => {REMEMBER_PAST_BOUND_SECONDS})"
LOG_SESSIONS_SQL = f"""
INSERT INTO revocation_log (kind, session_id, revoked_at, keep_until)
SELECT 'session', id, to_timestamp(at), to_timestamp(bound) + {_KEEP}
  FROM unnest($1::uuid[], $2::float8[], $3::float8[]) AS r(id, at, bound)"""  # noqa: S608
LOG_USER_SQL = f"""
INSERT INTO revocation_log (kind, user_id, generation, revoked_at, keep_until)
VALUES ('user', $1, $2, $3, $4::timestamptz + {_KEEP})"""  # noqa: S608
LOG_KEYS_SQL = f"""
INSERT INTO revocation_log (kind, revoked_at, keep_until)
VALUES ('keys', $1, $1::timestamptz + {_KEEP})"""  # noqa: S608


def revocations(rows: list[asyncpg.Record]) -> list[Revocation]:
    """Rows of (id, revoked_at, access_expires_max) as revocations."""
    return [
        Revocation(str(r["id"]), r["revoked_at"].timestamp(), r["access_expires_max"].timestamp())
        for r in rows
    ]


# An UPDATE that waited for a Refresh holding the session row re-reads it, so RETURNING
# gives the bound that Refresh raised: the revocation carries it.


async def revoke_session(
    conn: asyncpg.Connection, session_id: uuid.UUID, reason: str, now: datetime
) -> list[Revocation]:
    """Revoke one session on `conn` (in its transaction): [it] if this call revoked it."""
    rows = await conn.fetch(REVOKE_SESSION_SQL, session_id, now, reason)
    revoked = revocations(rows)
    await log_revoked(conn, revoked)
    return revoked


# A user's revocation is one row: the generation raised, with the user's bound as it is
# now. A login or refresh holding the user's row (to raise that bound) commits first, and
# its session is then of the generation revoked; see ROTATE_SQL.


async def revoke_user_sessions(
    conn: asyncpg.Connection, user_id: uuid.UUID, reason: str, now: datetime
) -> tuple[UserRevocation, int]:
    """Revoke every session of a user on `conn` (in its transaction): the revocation and
    how many live sessions it revoked (counted up to REVOKED_COUNT_LIMIT)."""
    row = await conn.fetchrow(REVOKE_USER_SESSIONS_SQL, user_id, now, reason, REVOKED_COUNT_LIMIT)
    assert row is not None
    revocation = UserRevocation(
        str(user_id),
        row["session_generation"],
        now.timestamp(),
        row["revoked_sessions_until"].timestamp(),
    )
    await conn.execute(
        LOG_USER_SQL, user_id, revocation.generation, now, row["revoked_sessions_until"]
    )
    return revocation, row["sessions"]


async def log_revoked(conn: asyncpg.Connection, revoked: list[Revocation]) -> None:
    """Append revoked sessions to the revocation log, in `conn`'s transaction."""
    if revoked:
        await conn.execute(
            LOG_SESSIONS_SQL,
            [uuid.UUID(r.session_id) for r in revoked],
            [r.revoked_at for r in revoked],
            [r.access_expires_max for r in revoked],
        )


async def log_keys_changed(conn: asyncpg.Connection, now: datetime) -> None:
    """Append a signing-key change to the revocation log, in `conn`'s transaction: every
    replica reloads its keys when it reaches it, and watchers get the new JWK Set."""
    await conn.execute(LOG_KEYS_SQL, now)
