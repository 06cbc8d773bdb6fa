-- How long a session's revocation must be remembered: the latest `exp` of any access
-- token the session was ever issued. Set by Issue and raised (greatest) by every Refresh
-- that signs an access token, in the same statement as the rotation, so it never depends
-- on AUTH_ACCESS_TTL as it is later. Revocation notifications, the revocation poll and the
-- janitor all read it (plus the largest leeway allowed, 300 s, and a 60 s margin).
--
-- No default, on purpose: a session whose bound is unknown must not exist (replicas of an
-- earlier version cannot create sessions once this has run: upgrade them together).
--
-- Existing sessions: the TTL their tokens were signed with is not recorded anywhere, so the
-- bound is their last activity (login, or the latest rotation; a replay of the rotated
-- token comes at most AUTH_REFRESH_REUSE_GRACE's limit of 300 s later, and signing follows
-- the database call by a moment: 60 s more) plus the largest AUTH_ACCESS_TTL the settings
-- ever accepted (ten years). Such sessions, once dead, stay in the table (and, if revoked,
-- in every replica's memory) that long: a one-time cost bounded by their number now.
--
-- No index on the column: it changes on every refresh, and an index would make each of
-- those updates a non-HOT one. The janitor scans as before; the start-up read of the
-- revoked sessions goes through sessions_revoked_at.
ALTER TABLE sessions ADD COLUMN access_expires_max timestamptz;
UPDATE sessions s
   SET access_expires_max = greatest(
           s.created_at,
           s.last_refreshed_at,
           (SELECT max(t.used_at) FROM refresh_tokens t WHERE t.session_id = s.id))
       + interval '300 seconds' + interval '60 seconds' + interval '315360000 seconds';
ALTER TABLE sessions ALTER COLUMN access_expires_max SET NOT NULL;
