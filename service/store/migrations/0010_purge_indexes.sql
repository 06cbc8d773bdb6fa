-- The janitor finds what it deletes through indexes, a small batch at a time, so a pass
-- costs the same on a table of millions of live rows as on an empty one.
--
-- Sessions: `purge_after` is the instant after which the session may be deleted: the
-- later of its access-token bound (`access_expires_max`) and the moment it died (the
-- earliest of its absolute expiry, its revocation and the expiry of its unused refresh
-- token). Every statement that changes one of those sets it, in the same statement
-- (create, rotate, replay within the grace window, revoke); the janitor deletes
-- `WHERE purge_after < cutoff ORDER BY purge_after` and re-checks each candidate against
-- the rows themselves, so a value a writer got wrong (an older replica during an upgrade)
-- delays a deletion but never makes one early.
--
-- NULL means "not computed yet": the rows that exist now. Filling them here would rewrite
-- the whole table while this migration holds the table's lock (every replica waiting);
-- the janitor fills them instead, a batch at a time, through the same index (btree
-- indexes NULLs). The price: this column changes on every refresh, and being indexed,
-- those updates are no longer HOT ones (they add an index entry each).
ALTER TABLE sessions ADD COLUMN purge_after timestamptz;
CREATE INDEX sessions_purge_after ON sessions (purge_after);

-- Deleted users: walked in (deleted_at, id) order, past those whose sessions remain.
CREATE INDEX users_deleted ON users (deleted_at, id) WHERE deleted_at IS NOT NULL;

-- Throttle rows: the instant after which the row makes no one wait, the same expression
-- as the janitor's condition (it replaces the index on last_failure_at, which only the
-- janitor read, and which its OR could not use).
DROP INDEX login_throttle_last_failure_at;
CREATE INDEX login_throttle_forget_after ON login_throttle ((greatest(
    CASE WHEN failures = 0 THEN '-infinity'::timestamptz ELSE last_failure_at END,
    coalesce(locked_until, '-infinity'::timestamptz),
    CASE WHEN pending = 0 THEN '-infinity'::timestamptz
         ELSE coalesce(pending_at, 'infinity'::timestamptz) END)));
