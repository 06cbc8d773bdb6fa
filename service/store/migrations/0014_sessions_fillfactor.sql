-- A refresh rewrites its session's row (who refreshed it, and when; its bound): when no
-- indexed column changes (`purge_after` moves in steps: service/store/revocations.py,
-- PURGE_AFTER_STEP_SECONDS) the new version can be a HOT one, with no new index entries,
-- but only if it fits on the same page. Pages filled to 70 % leave room for it. This
-- applies to pages filled from now on; the rows that exist stay where they are (nothing is
-- rewritten under this migration's lock), and the space that pruning frees on their pages
-- serves them as before.
ALTER TABLE sessions SET (fillfactor = 70);
