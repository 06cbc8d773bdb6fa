"""The refresh-token family invariants, checked over the whole database.

Used by the soak (`service.loadtest.soak`) and the fault tests: after any crash, cut
connection or restart, every live session has exactly one unused refresh token, every
used token exactly one child (the one it names), no token has a parent that is not
marked used (or missing: only the oldest token kept, after pruning), no session holds
more tokens than pruning allows; and every session's stored purge time (`purge_after`,
when computed) is the one its rows give, or later by at most PURGE_AFTER_STEP_SECONDS (a
rotation moves it in steps), never earlier.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from service.store.refresh_tokens import REFRESH_TOKEN_PRUNE_STEP, REFRESH_TOKENS_KEPT
from service.store.revocations import PURGE_AFTER_STEP_SECONDS, SESSION_PURGE_AFTER

_LIVE_SESSIONS_WITHOUT_ONE_CURRENT_TOKEN = """
SELECT s.id, count(rt.token_hash) FILTER (WHERE rt.used_at IS NULL) AS unused
  FROM sessions s
  LEFT JOIN refresh_tokens rt ON rt.session_id = s.id
 WHERE s.revoked_at IS NULL AND s.expires_at > $1
 GROUP BY s.id
HAVING count(rt.token_hash) FILTER (WHERE rt.used_at IS NULL) <> 1
"""

_USED_TOKENS_WITHOUT_THEIR_ONE_CHILD = """
SELECT encode(p.token_hash, 'hex') AS token, p.session_id,
       (p.child_hash IS NULL) AS names_no_child,
       (c.token_hash IS NULL) AS child_missing,
       (c.parent_hash IS DISTINCT FROM p.token_hash) AS child_points_elsewhere,
       (c.session_id IS DISTINCT FROM p.session_id) AS child_in_other_session,
       (SELECT count(*) FROM refresh_tokens k WHERE k.parent_hash = p.token_hash) AS children
  FROM refresh_tokens p
  LEFT JOIN refresh_tokens c ON c.token_hash = p.child_hash
 WHERE p.used_at IS NOT NULL
   AND (p.child_hash IS NULL
        OR c.token_hash IS NULL
        OR c.parent_hash IS DISTINCT FROM p.token_hash
        OR c.session_id IS DISTINCT FROM p.session_id
        OR (SELECT count(*) FROM refresh_tokens k WHERE k.parent_hash = p.token_hash) <> 1)
"""

_UNUSED_TOKENS_NAMING_A_CHILD = """
SELECT encode(token_hash, 'hex') AS token, session_id
  FROM refresh_tokens WHERE used_at IS NULL AND child_hash IS NOT NULL
"""

# A parent may be missing only where the session's older tokens were pruned: the oldest
# token kept has none.
_TOKENS_WHOSE_PARENT_IS_NOT_USED = """
SELECT encode(c.token_hash, 'hex') AS token, c.session_id, (p.token_hash IS NULL) AS parent_missing
  FROM refresh_tokens c
  LEFT JOIN refresh_tokens p ON p.token_hash = c.parent_hash
 WHERE c.parent_hash IS NOT NULL
   AND (p.used_at IS NULL AND p.token_hash IS NOT NULL
        OR p.token_hash IS NULL
           AND EXISTS (SELECT 1 FROM refresh_tokens o
                        WHERE o.session_id = c.session_id AND o.rotation < c.rotation))
"""

_SESSIONS_HOLDING_TOO_MANY_TOKENS = f"""
SELECT session_id, count(*) AS tokens FROM refresh_tokens
 GROUP BY session_id HAVING count(*) > {REFRESH_TOKENS_KEPT + REFRESH_TOKEN_PRUNE_STEP}
"""  # noqa: S608 (constants only)

_PARENTS_WITH_SEVERAL_CHILDREN = """
SELECT encode(parent_hash, 'hex') AS parent, count(*) AS children
  FROM refresh_tokens WHERE parent_hash IS NOT NULL
 GROUP BY parent_hash HAVING count(*) > 1
"""

_SESSIONS_WITH_A_WRONG_PURGE_TIME = f"""
SELECT id, stored, computed
  FROM (SELECT s.id, s.purge_after AS stored, {SESSION_PURGE_AFTER} AS computed
          FROM sessions s
         WHERE s.purge_after IS NOT NULL) c
 WHERE NOT (stored BETWEEN computed
                       AND computed + interval '{PURGE_AFTER_STEP_SECONDS} seconds')
    OR computed IS NULL
"""  # noqa: S608 (constants only)


async def family_invariant_violations(
    conn: asyncpg.Connection, *, now: datetime | None = None
) -> list[str]:
    """Every broken refresh-token family invariant in the database, one line each.

    Sessions past expires_at (at `now`, default the database's now()) are not live.
    """
    problems: list[str] = []
    at = now if now is not None else await conn.fetchval("SELECT now()")
    for r in await conn.fetch(_LIVE_SESSIONS_WITHOUT_ONE_CURRENT_TOKEN, at):
        problems.append(
            f"live session {r['id']} has {r['unused']} unused refresh tokens (want exactly 1)"
        )
    for r in await conn.fetch(_USED_TOKENS_WITHOUT_THEIR_ONE_CHILD):
        problems.append(
            f"used token {r['token'][:12]} (session {r['session_id']}): "
            f"names_no_child={r['names_no_child']} child_missing={r['child_missing']} "
            f"child_points_elsewhere={r['child_points_elsewhere']} "
            f"child_in_other_session={r['child_in_other_session']} "
            f"children={r['children']} (want exactly 1 child, the named one)"
        )
    for r in await conn.fetch(_UNUSED_TOKENS_NAMING_A_CHILD):
        problems.append(f"unused token {r['token'][:12]} (session {r['session_id']}) names a child")
    for r in await conn.fetch(_TOKENS_WHOSE_PARENT_IS_NOT_USED):
        what = "does not exist" if r["parent_missing"] else "is not marked used"
        problems.append(f"token {r['token'][:12]} (session {r['session_id']}): its parent {what}")
    for r in await conn.fetch(_SESSIONS_HOLDING_TOO_MANY_TOKENS):
        problems.append(
            f"session {r['session_id']} holds {r['tokens']} refresh tokens "
            f"(max {REFRESH_TOKENS_KEPT + REFRESH_TOKEN_PRUNE_STEP})"
        )
    for r in await conn.fetch(_PARENTS_WITH_SEVERAL_CHILDREN):
        problems.append(f"parent {r['parent'][:12]} has {r['children']} children (max 1)")
    for r in await conn.fetch(_SESSIONS_WITH_A_WRONG_PURGE_TIME):
        problems.append(
            f"session {r['id']}: purge_after {r['stored']} but its rows give {r['computed']}"
            f" (it may be later by {PURGE_AFTER_STEP_SECONDS} s at most, never earlier)"
        )
    return problems
