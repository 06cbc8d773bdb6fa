-- Signing-key rotation without downtime.
-- A new key is published (JWKS, verification) at once but signs only from
-- activates_at, a moment later, so every replica knows it before any token it
-- signed reaches them. A superseded key is retired once no token it signed can
-- be alive: it leaves the JWKS, and its private half is wiped (it never signs
-- again); the janitor deletes the row after AUTH_EVENT_RETENTION.
ALTER TABLE signing_keys ADD COLUMN activates_at timestamptz;
UPDATE signing_keys SET activates_at = created_at;
ALTER TABLE signing_keys ALTER COLUMN activates_at SET NOT NULL;
ALTER TABLE signing_keys ALTER COLUMN private_key_sealed DROP NOT NULL;
UPDATE signing_keys SET private_key_sealed = NULL WHERE retired_at IS NOT NULL;
ALTER TABLE signing_keys ADD CONSTRAINT retired_keys_are_wiped
    CHECK (retired_at IS NULL OR private_key_sealed IS NULL);

-- ListSessions: a subject's sessions, newest first.
CREATE INDEX sessions_user_created ON sessions (user_id, created_at DESC);

-- Deleted users (admin DeleteUser): the username is free at once, but the row
-- stays, disabled, until the janitor has deleted every session of theirs, so
-- the revocations of those sessions are remembered while their tokens live.
ALTER TABLE users ADD COLUMN deleted_at timestamptz;
ALTER TABLE users DROP CONSTRAINT users_username_key;
CREATE UNIQUE INDEX users_username_live ON users (username) WHERE deleted_at IS NULL;
