-- A login in two round trips (it was four): the throttle's reservation reads the user's row
-- too, and the throttle's success is settled by the session's own statement, in its
-- transaction (one commit fewer). The rules do not change, only where they are applied.
--
-- 1. `settle_login_success`: a successful attempt's settlement, the statement the service
--    sent on its own (service/store/throttle.py) made a function, so that `start_session`
--    and that statement (still used when the session is not written: the caller left, a
--    scope refused) apply one definition. The values are the domain's
--    (`LoginThrottle.success` in service/domain/throttle.py); the keys' rows are locked in
--    key order, as everywhere.
CREATE FUNCTION settle_login_success(
    p_keys text[], p_clear boolean[], p_previous timestamptz[], p_reserved_at timestamptz)
RETURNS void
LANGUAGE sql VOLATILE AS $$
WITH locked AS (
    SELECT key FROM login_throttle WHERE key = ANY(p_keys) ORDER BY key FOR UPDATE)
UPDATE login_throttle AS t
   SET pending = greatest(t.pending - 1, 0),
       failures = CASE WHEN v.clear THEN 0 ELSE greatest(t.failures - 1, 0) END,
       locked_until = CASE WHEN v.clear THEN NULL ELSE t.locked_until END,
       last_failure_at = CASE WHEN t.last_failure_at = p_reserved_at THEN v.previous
                              ELSE t.last_failure_at END
  FROM locked, unnest(p_keys, p_clear, p_previous) AS v(key, clear, previous)
 WHERE t.key = locked.key AND v.key = t.key
$$;

-- 2. `reserve_login_attempt` (migration 0013, whose comment says what it decides; that is
--    unchanged) with two differences:
--    - The keys' rows are locked without being written: `ON CONFLICT DO UPDATE .. WHERE
--      false` locks each existing row (in key order, the insert's order) and updates none,
--      where `SET pending = t.pending` wrote a new version of every key's row only to lock
--      it. A missing row is still made by the same statement, so the rows are made or
--      locked in key order in one step (an INSERT .. DO NOTHING then a SELECT .. FOR
--      UPDATE would leave a gap between the two where the janitor may delete a row, and a
--      retry that waits for a key while holding others can deadlock). The rows are read by
--      the next statement, whose new snapshot (READ COMMITTED) sees them as locked. An
--      attempt that is not counted (it waits, or is busy) now writes nothing; a counted
--      one writes one version per key instead of two.
--    - With p_username_key, the live user of that canonical username is read (after the
--      keys' locks, as the separate statement that did this read after the reservation) and
--      returned on every row (u_*: NULL if there is none), but only for a counted attempt:
--      one that is refused checks no password and needs no user.
--    Replicas of the previous version call it with five arguments and read the r_* columns:
--    that still works (p_username_key defaults to NULL), as does their own settlement.
DROP FUNCTION reserve_login_attempt(text[], timestamptz, timestamptz, integer[], timestamptz[]);
CREATE FUNCTION reserve_login_attempt(
    p_keys text[], p_now timestamptz, p_pending_since timestamptz,
    p_free_failures integer[], p_window_starts timestamptz[], p_username_key text DEFAULT NULL)
RETURNS TABLE (r_key text, r_failures integer, r_last_failure_at timestamptz,
               r_locked_until timestamptz, r_pending integer, r_pending_at timestamptz,
               r_reserved boolean, u_id uuid, u_username text, u_password_hash text,
               u_scopes text[], u_disabled boolean, u_created_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_rows login_throttle[];
    v_reserved boolean;
    v_user users;
BEGIN
    INSERT INTO login_throttle AS t (key, failures, last_failure_at, pending)
    SELECT k, 0, p_now, 0 FROM unnest(p_keys) AS k ORDER BY k
        ON CONFLICT (key) DO UPDATE SET pending = t.pending WHERE false;

    -- A new snapshot: the rows as locked.
    SELECT array_agg(t ORDER BY t.key) INTO v_rows
      FROM login_throttle AS t WHERE t.key = ANY(p_keys);

    -- Each key's counts as the rule sees them (d.failures, d.pending), and whether it
    -- waits or is busy.
    SELECT coalesce(bool_and(NOT d.waits AND NOT d.busy), true) INTO v_reserved
      FROM (SELECT c.locked_until IS NOT NULL AND c.locked_until > p_now AS waits,
                   c.failures > c.free AND c.pending > 0 AS busy
              FROM (SELECT s.locked_until, p.free,
                           greatest(CASE WHEN s.last_failure_at < p.window_start THEN 0
                                         ELSE s.failures END, v.pending) AS failures,
                           v.pending
                      FROM unnest(v_rows) AS s
                      JOIN unnest(p_keys, p_free_failures, p_window_starts)
                           AS p(key, free, window_start) ON p.key = s.key
                     CROSS JOIN LATERAL (
                           SELECT CASE WHEN s.pending_at >= p_pending_since
                                       THEN s.pending ELSE 0 END AS pending) v) c) d;

    IF v_reserved THEN
        UPDATE login_throttle AS t
           SET failures = greatest(CASE WHEN t.last_failure_at < p.window_start THEN 0
                                        ELSE t.failures END,
                                   CASE WHEN t.pending_at >= p_pending_since
                                        THEN t.pending ELSE 0 END) + 1,
               pending = CASE WHEN t.pending_at >= p_pending_since
                              THEN t.pending ELSE 0 END + 1,
               last_failure_at = p_now, pending_at = p_now
          FROM unnest(p_keys, p_window_starts) AS p(key, window_start)
         WHERE t.key = p.key;
        IF p_username_key IS NOT NULL THEN
            SELECT * INTO v_user FROM users
             WHERE username_key = p_username_key AND deleted_at IS NULL;
        END IF;
    END IF;

    RETURN QUERY
        SELECT s.key, s.failures, s.last_failure_at, s.locked_until, s.pending, s.pending_at,
               v_reserved, v_user.id, v_user.username, v_user.password_hash, v_user.scopes,
               v_user.disabled, v_user.created_at
          FROM unnest(v_rows) AS s ORDER BY s.key;
END
$$;

-- 3. `start_session` (migration 0012, whose comment says why it is a function and what it
--    writes; that is unchanged) settles the login's throttle reservation as its last
--    statement when given one (p_settle_*: `settle_login_success`'s arguments), in its
--    transaction: the settlement and the session commit together, in one round trip.
--    - Also when the user changed during the hash (disabled, a new password: no session,
--      generation NULL): the password that was checked was right, so the attempt is a
--      success for the throttle, as it was when the settlement was sent before the
--      session (it must not count as a guess against the address or the username).
--    - Lock order: the user's row, then the keys' rows in key order. Nothing takes them the
--      other way round: the reservation reads the user's row without locking it, and no
--      statement that locks a user's row (a change, a deletion, a revocation, a refresh)
--      touches the throttle. Settling last also keeps the keys' rows (an address's row is
--      shared by every login through one gateway) locked only from the settlement to the
--      commit, not for the session's writes.
--    Replicas of the previous version call it with nineteen arguments: the new ones
--    default to NULL (nothing settled here), and they settle as before.
DROP FUNCTION start_session(
    uuid, uuid, text[], text, timestamptz, timestamptz, text, text, bytea, timestamptz, text,
    text, jsonb, text, timestamptz, timestamptz, integer, integer, float8);
CREATE FUNCTION start_session(
    p_session_id uuid, p_user_id uuid, p_scopes text[], p_audience text,
    p_created_at timestamptz, p_expires_at timestamptz, p_peer text, p_user_agent text,
    p_token_hash bytea, p_token_expires_at timestamptz, p_event_kind text,
    p_event_subject text, p_event_detail jsonb, p_verified_hash text,
    p_access_expires_at timestamptz, p_user_bound timestamptz,
    p_keep_others integer, p_max_evictions integer, p_keep_past_bound float8,
    p_settle_keys text[] DEFAULT NULL, p_settle_clear boolean[] DEFAULT NULL,
    p_settle_previous timestamptz[] DEFAULT NULL, p_settle_reserved_at timestamptz DEFAULT NULL,
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

    IF generation IS NOT NULL THEN
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
                       THEN least(s.purge_after, greatest(s.access_expires_max, p_created_at))
                       END
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
    END IF;

    IF p_settle_keys IS NOT NULL THEN
        PERFORM settle_login_success(p_settle_keys, p_settle_clear, p_settle_previous,
                                     p_settle_reserved_at);
    END IF;
END
$$;
