-- A refused login attempt leaves no throttle rows behind (found by an outside review: from
-- an address already made to wait, every further Issue with a new username still made a
-- `user:` row, ~540 rows a second from one client, each kept until the janitor's next pass).
-- The reservation (`reserve_login_attempt`, migrations 0013, 0015 and 0016; what it decides
-- is unchanged) still makes the missing rows and locks the others in one step, in key
-- order (migration 0015 says why that must stay one statement); when the attempt is refused
-- (a key waits, or is busy), it now deletes the rows it made, in the same transaction. They
-- held nothing (no failure, nothing pending, no wait: what the rule reads for a missing
-- row), so the janitor would delete them at its next pass anyway; the caller still gets
-- every key's state to compute the wait. Its plan setting of migration 0016 is kept.
-- Older replicas call it as before.
CREATE OR REPLACE FUNCTION reserve_login_attempt(
    p_keys text[], p_now timestamptz, p_pending_since timestamptz,
    p_free_failures integer[], p_window_starts timestamptz[], p_username_key text DEFAULT NULL)
RETURNS TABLE (r_key text, r_failures integer, r_last_failure_at timestamptz,
               r_locked_until timestamptz, r_pending integer, r_pending_at timestamptz,
               r_reserved boolean, u_id uuid, u_username text, u_password_hash text,
               u_scopes text[], u_disabled boolean, u_created_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_made text[];
    v_rows login_throttle[];
    v_reserved boolean;
    v_user users;
BEGIN
    -- Only the rows made here come back (the conflict's update does nothing).
    WITH made AS (
        INSERT INTO login_throttle AS t (key, failures, last_failure_at, pending)
        SELECT k, 0, p_now, 0 FROM unnest(p_keys) AS k ORDER BY k
            ON CONFLICT (key) DO UPDATE SET pending = t.pending WHERE false
        RETURNING t.key)
    SELECT array_agg(key) INTO v_made FROM made;

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

    IF NOT v_reserved AND v_made IS NOT NULL THEN
        -- Refused: the rows made for this attempt hold nothing (no failure, nothing
        -- pending, no wait) and go, still locked by us, in the same transaction.
        DELETE FROM login_throttle WHERE key = ANY(v_made);
    END IF;

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

