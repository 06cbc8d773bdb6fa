-- Usernames are unique by a canonical key (Unicode NFKC, case-folded, NFKC
-- again: service/domain/usernames.py), so `alice`, `Alice` and full-width
-- letters are one account; `username` keeps the form the user was created
-- with, for display. PostgreSQL has no exact case fold, so the key of each
-- existing row is computed in Python by the step below, which refuses (and
-- so rolls back this migration) if two live users' keys collide.
ALTER TABLE users ADD COLUMN username_key text;
-- authsvc:step fill_username_keys
ALTER TABLE users ALTER COLUMN username_key SET NOT NULL;
DROP INDEX users_username_live;
CREATE UNIQUE INDEX users_username_key_live ON users (username_key) WHERE deleted_at IS NULL;
