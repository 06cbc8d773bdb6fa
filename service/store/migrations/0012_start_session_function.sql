-- A login's session in one round trip: `start_session` does what the login's transaction
-- of four statements did (BEGIN, the session, the cap's evictions, COMMIT), called as one
-- statement in autocommit (service/store/sessions.py, START_SESSION_SQL).
--
-- Why a function and not one statement: the evictions must read the user's sessions
-- after the user's row lock is held. A single statement (CTEs included) reads with one
-- snapshot, taken before the lock is waited for, so it would miss the session of a
-- concurrent login of the same user that committed while it waited, and the cap would be
-- overrun. A VOLATILE plpgsql function in READ COMMITTED takes a new snapshot for each
-- statement it runs: its second statement sees every login that held the lock before it.
--
-- 1. The user's row is locked (its bound raised) only if the user is still enabled with
--    the hash that was verified; the session, its first refresh token and the login
--    event are written with it. Nothing else happens if the user changed: NULL.
-- 2. The oldest of the user's unrevoked sessions of the current generation beyond the
--    newest p_keep_others (the cap - 1, besides the new one) are revoked, p_max_evictions
--    at most, and each gets its revocation-log row (migration 0011: numbered at commit)
--    and its `session_revoked` event.
-- Returned: the session's generation (NULL: the user changed) and the evicted sessions'
-- ids, revocation times and access-token bounds.
--
-- The purge time of an evicted session is PURGE_AFTER_ON_REVOKE's (service/store/
-- revocations.py) and its log row's keep_until LOG_SESSIONS_SQL's, with the margin
-- passed in (p_keep_past_bound): changing either there means a migration here.
CREATE FUNCTION start_session(
    p_session_id uuid, p_user_id uuid, p_scopes text[], p_audience text,
    p_created_at timestamptz, p_expires_at timestamptz, p_peer text, p_user_agent text,
    p_token_hash bytea, p_token_expires_at timestamptz, p_event_kind text,
    p_event_subject text, p_event_detail jsonb, p_verified_hash text,
    p_access_expires_at timestamptz, p_user_bound timestamptz,
    p_keep_others integer, p_max_evictions integer, p_keep_past_bound float8,
    OUT generation bigint, OUT evicted_ids uuid[], OUT evicted_at timestamptz[],
    OUT evicted_bounds timestamptz[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    WITH still_valid AS (
        UPDATE users SET access_expires_max = CASE WHEN access_expires_max >= p_access_expires_at
                                                   THEN access_expires_max ELSE p_user_bound END
         WHERE id = p_user_id AND NOT disabled AND password_hash = p_verified_hash
        RETURNING session_generation),
    session AS (
        INSERT INTO sessions (id, user_id, scopes, audience, created_at, expires_at, peer,
                              user_agent, access_expires_max, user_generation, purge_after)
        SELECT p_session_id, p_user_id, p_scopes, p_audience, p_created_at, p_expires_at,
               p_peer, p_user_agent, p_access_expires_at, session_generation,
               greatest(p_access_expires_at, least(p_expires_at, p_token_expires_at))
          FROM still_valid
        RETURNING id, user_generation),
    token AS (
        INSERT INTO refresh_tokens (token_hash, session_id, issued_at, expires_at)
        SELECT p_token_hash, id, p_created_at, p_token_expires_at FROM session),
    event AS (
        INSERT INTO security_events
               (occurred_at, last_occurred_at, kind, subject, session_id, peer, detail)
        SELECT p_created_at, p_created_at, p_event_kind, p_event_subject, id, p_peer,
               p_event_detail
          FROM session)
    SELECT user_generation INTO generation FROM session;
    IF generation IS NULL THEN
        RETURN;
    END IF;

    -- A new snapshot: every login of this user that held the row lock before us is seen.
    WITH excess AS (
        SELECT count(*) AS n FROM (
            SELECT 1 FROM sessions
             WHERE user_id = p_user_id AND user_generation = generation
               AND revoked_at IS NULL AND id <> p_session_id
             ORDER BY created_at DESC, id DESC
            OFFSET p_keep_others LIMIT p_max_evictions) beyond),
    oldest AS (
        SELECT id FROM sessions
         WHERE user_id = p_user_id AND user_generation = generation
           AND revoked_at IS NULL AND id <> p_session_id
         ORDER BY created_at, id
         LIMIT (SELECT n FROM excess)),
    evicted AS (
        UPDATE sessions s
           SET revoked_at = p_created_at, revoke_reason = 'session_limit',
               purge_after = CASE WHEN s.purge_after IS NOT NULL
                   THEN least(s.purge_after, greatest(s.access_expires_max, p_created_at)) END
          FROM oldest WHERE s.id = oldest.id AND s.revoked_at IS NULL
        RETURNING s.id, s.revoked_at, s.access_expires_max),
    logged AS (
        INSERT INTO revocation_log (kind, session_id, revoked_at, keep_until)
        SELECT 'session', id, revoked_at,
               access_expires_max + make_interval(secs => p_keep_past_bound)
          FROM evicted ORDER BY revoked_at, id),
    recorded AS (
        INSERT INTO security_events
               (occurred_at, last_occurred_at, kind, subject, session_id, peer, detail)
        SELECT p_created_at, p_created_at, 'session_revoked', p_user_id::text, id, p_peer,
               '{"reason": "session_limit"}'::jsonb
          FROM evicted ORDER BY revoked_at, id)
    SELECT array_agg(id ORDER BY id), array_agg(revoked_at ORDER BY id),
           array_agg(access_expires_max ORDER BY id)
      INTO evicted_ids, evicted_at, evicted_bounds
      FROM evicted;
END
$$;
