-- The revocation log: every revocation (one session, every session of a user) and every
-- signing-key change appends a row, in the transaction that makes it, with a strictly
-- increasing `sequence`. Replicas (and the verifiers that watch them) follow it by reading
-- `sequence > last_seen` in order; NOTIFY on authsvc_revocation_log only says "the log
-- advanced to N" (a wake-up, never the data). Why and how: docs/design.md, "The
-- revocation log".
--
-- Commit order equals sequence order: the sequences are taken at COMMIT, by a deferred
-- constraint trigger, from the one row of revocation_log_head. That row's lock is held
-- from there until the transaction ends, so a second revoking transaction takes its
-- numbers only once the first has committed (and is visible): a reader that has seen N
-- has seen every row below N. The lock is held only for the commit itself. Sequences
-- have no gaps (a transaction that fails to commit gives its numbers back).
--
-- keep_until: how long the row must be remembered (the session's or user's bound, plus
-- the largest leeway and a margin, as RevocationState.remembered_until). The janitor
-- deletes rows past it, in bounded batches, and raises revocation_log_horizon to the
-- largest sequence it deleted: a reader whose cursor is below it reads everything again.
CREATE TABLE revocation_log (
    id          bigserial PRIMARY KEY,
    sequence    bigint UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('session', 'user', 'keys')),
    session_id  uuid,
    user_id     uuid,
    generation  bigint,
    revoked_at  timestamptz NOT NULL,
    keep_until  timestamptz NOT NULL,
    CHECK (kind <> 'session' OR session_id IS NOT NULL),
    CHECK (kind <> 'user' OR (user_id IS NOT NULL AND generation IS NOT NULL))
);
CREATE INDEX revocation_log_keep_until ON revocation_log (keep_until);

CREATE TABLE revocation_log_head (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    sequence bigint NOT NULL
);
CREATE TABLE revocation_log_horizon (
    one               boolean PRIMARY KEY DEFAULT true CHECK (one),
    compacted_through bigint NOT NULL
);

-- What is remembered now (revoked sessions and users whose tokens may be alive) becomes
-- the log's first rows. 360 s = MAX_LEEWAY (300) + REVOCATION_MARGIN_SECONDS (60).
INSERT INTO revocation_log (sequence, kind, session_id, user_id, generation, revoked_at,
                            keep_until)
SELECT row_number() OVER (ORDER BY revoked_at, kind, key), kind, session_id, user_id,
       generation, revoked_at, keep_until
  FROM (SELECT 'session' AS kind, id AS session_id, NULL::uuid AS user_id,
               NULL::bigint AS generation, revoked_at,
               access_expires_max + interval '360 seconds' AS keep_until, id AS key
          FROM sessions
         WHERE revoked_at IS NOT NULL
           AND access_expires_max + interval '360 seconds' >= now()
        UNION ALL
        SELECT 'user', NULL, id, session_generation, sessions_revoked_at,
               revoked_sessions_until + interval '360 seconds', id
          FROM users
         WHERE sessions_revoked_at IS NOT NULL
           AND revoked_sessions_until + interval '360 seconds' >= now()) remembered;
INSERT INTO revocation_log_head (sequence)
SELECT coalesce(max(sequence), 0) FROM revocation_log;
INSERT INTO revocation_log_horizon (compacted_through) VALUES (0);

-- This transaction's rows are the only unnumbered ones it can see (others' are not
-- committed; committed ones are numbered): the first trigger to fire numbers them all at
-- once, in insertion order, and sends one NOTIFY; the others find their row numbered.
CREATE INDEX revocation_log_unnumbered ON revocation_log (id) WHERE sequence IS NULL;

CREATE FUNCTION revocation_log_assign_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
    appended bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM revocation_log WHERE id = NEW.id AND sequence IS NULL) THEN
        RETURN NULL;
    END IF;
    -- Held until this transaction ends: the next one numbers its rows after our commit.
    SELECT sequence INTO head FROM revocation_log_head FOR UPDATE;
    UPDATE revocation_log l SET sequence = head + m.n
      FROM (SELECT id, row_number() OVER (ORDER BY id) AS n
              FROM revocation_log WHERE sequence IS NULL) m
     WHERE l.id = m.id;
    GET DIAGNOSTICS appended = ROW_COUNT;
    UPDATE revocation_log_head SET sequence = head + appended;
    PERFORM pg_notify('authsvc_revocation_log', (head + appended)::text);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER revocation_log_sequence AFTER INSERT ON revocation_log
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION revocation_log_assign_sequence();
