-- Revoking every session of a user (DisableUser, SetPassword, DeleteUser, Revoke by
-- subject) writes one row, the user's, whatever the number of their sessions: one UPDATE
-- of every session hit the statement timeout with a few hundred thousand of them, and
-- the user stayed enabled.
--
-- users.session_generation is raised by each such revocation; a session records its user's
-- generation when it started (sessions.user_generation), and one whose generation is below
-- its user's is revoked, whether or not its revoked_at is written yet. Refresh reads both
-- in its lock query; access tokens carry the session's generation (claim `ugen`), and each
-- replica keeps the latest generation of every user revoked lately in memory (NOTIFY on
-- authsvc_user_revocations, polls, start-up load), so Validate needs no database.
--
-- users.access_expires_max is at least the `exp` of every access token signed for any of
-- the user's sessions (Issue and Refresh raise it, in steps, before they sign), so a
-- revocation knows in O(1) how long it must be remembered: revoked_sessions_until is its
-- value at the latest revocation (the same rule as sessions.access_expires_max). Users
-- inserted without it (older tools) start at the epoch: their first login raises it.
--
-- sessions_revoked_at / sessions_revoke_reason: when and why, the latest time. The janitor
-- copies them into the revoked sessions' revoked_at / revoke_reason in bounded batches
-- (users with sessions_revoke_pending), for the admin views and the clean-up.
--
-- sessions.user_generation defaults to 0, the oldest: a session written without it (an
-- older replica during an upgrade) counts as revoked by any revocation of its user.
ALTER TABLE users
    ADD COLUMN session_generation      bigint NOT NULL DEFAULT 0,
    ADD COLUMN access_expires_max      timestamptz NOT NULL DEFAULT 'epoch',
    ADD COLUMN sessions_revoked_at     timestamptz,
    ADD COLUMN sessions_revoke_reason  text,
    ADD COLUMN revoked_sessions_until  timestamptz,
    ADD COLUMN sessions_revoke_pending boolean NOT NULL DEFAULT false;
UPDATE users u SET access_expires_max = m.bound
  FROM (SELECT user_id, max(access_expires_max) AS bound FROM sessions GROUP BY user_id) m
 WHERE m.user_id = u.id;
ALTER TABLE sessions ADD COLUMN user_generation bigint NOT NULL DEFAULT 0;

-- A user's unrevoked sessions by generation, oldest first: Issue's session cap, the
-- count a revocation reports, ListSessions and the janitor's batches each read a bounded
-- range of it.
DROP INDEX sessions_user_live;
CREATE INDEX sessions_user_live ON sessions (user_id, user_generation, created_at, id)
    WHERE revoked_at IS NULL;
-- The revocation poll (recent ones) and the start-up load (those still remembered).
CREATE INDEX users_sessions_revoked_at ON users (sessions_revoked_at)
    WHERE sessions_revoked_at IS NOT NULL;
CREATE INDEX users_revoked_sessions_until ON users (revoked_sessions_until)
    WHERE revoked_sessions_until IS NOT NULL;
CREATE INDEX users_sessions_revoke_pending ON users (id) WHERE sessions_revoke_pending;
