-- A login attempt's throttle reservation in one round trip: `reserve_login_attempt` does
-- what the transaction of four statements did (BEGIN, the keys' rows locked and read,
-- the counts written, COMMIT), called as one statement in autocommit
-- (service/store/throttle.py, RESERVE_LOGIN_ATTEMPT_SQL).
--
-- The rule is the domain's (`decide_reservation` in service/domain/throttle.py): this is
-- its form in SQL, with each key's policy passed in (p_free_failures, and p_window_starts:
-- failures before it are forgotten), and it is held to it by a differential test on
-- generated states (tests/test_throttle_decision_differential.py). The service runs the
-- domain's rule on the rows this returns and refuses to go on if the two disagree.
--
-- 1. The keys' rows, made if missing, are locked in key order (two attempts sharing keys
--    cannot deadlock) and read.
-- 2. Under that lock, per key: pending attempts count only if reserved at or after
--    p_pending_since (a NULL pending_at compares as not: none count); failures count only
--    if the latest is at or after the key's window start; the failures are at least the pending ones; a key waits while
--    locked_until is after p_now, and is busy while its failures are over its allowance
--    and some of them are still pending. If no key waits or is busy, the attempt is
--    counted against every key (failures + 1, pending + 1, both stamped p_now);
--    otherwise nothing is written.
-- Returned: each key's row as read under the lock, and whether the attempt was counted.
CREATE FUNCTION reserve_login_attempt(
    p_keys text[], p_now timestamptz, p_pending_since timestamptz,
    p_free_failures integer[], p_window_starts timestamptz[])
RETURNS TABLE (r_key text, r_failures integer, r_last_failure_at timestamptz,
               r_locked_until timestamptz, r_pending integer, r_pending_at timestamptz,
               r_reserved boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_rows login_throttle[];
    v_reserved boolean;
BEGIN
    WITH locked AS (
        INSERT INTO login_throttle AS t (key, failures, last_failure_at, pending)
        SELECT k, 0, p_now, 0 FROM unnest(p_keys) AS k ORDER BY k
            ON CONFLICT (key) DO UPDATE SET pending = t.pending
        RETURNING t.*)
    SELECT array_agg(locked ORDER BY locked.key) INTO v_rows FROM locked;

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
    END IF;

    RETURN QUERY
        SELECT s.key, s.failures, s.last_failure_at, s.locked_until, s.pending, s.pending_at,
               v_reserved
          FROM unnest(v_rows) AS s ORDER BY s.key;
END
$$;
