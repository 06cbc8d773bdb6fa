-- authsvc schema, version 1.
-- Every timestamp is written by the service from its clock (never now()), so
-- tests with a fake clock see one consistent time.

CREATE TABLE users (
    id              uuid PRIMARY KEY,
    username        text NOT NULL UNIQUE,
    password_hash   text NOT NULL,              -- argon2id PHC string
    scopes          text[] NOT NULL DEFAULT '{}',
    disabled        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- Signing keys shared by every replica. Private keys are sealed with AES-GCM
-- under the key-encryption key (AUTH_KEK); the database never sees them bare.
CREATE TABLE signing_keys (
    kid                 text PRIMARY KEY,
    alg                 text NOT NULL,
    public_jwk          jsonb NOT NULL,
    private_key_sealed  bytea NOT NULL,
    created_at          timestamptz NOT NULL,
    retired_at          timestamptz                  -- stops signing; verifies until tokens expire
);

-- Server-wide secrets (the refresh-token derivation key), sealed like keys.
CREATE TABLE server_secrets (
    name        text PRIMARY KEY,
    sealed      bytea NOT NULL,
    created_at  timestamptz NOT NULL
);

-- A session is a refresh-token family: it starts at login and ends when
-- revoked or past expires_at (the absolute lifetime, never extended).
CREATE TABLE sessions (
    id                  uuid PRIMARY KEY,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scopes              text[] NOT NULL,
    audience            text NOT NULL,
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    last_refreshed_at   timestamptz,
    revoked_at          timestamptz,
    revoke_reason       text,
    peer                text,
    user_agent          text
);
CREATE INDEX sessions_user_live ON sessions (user_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_revoked_at ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

-- Refresh tokens, stored only as SHA-256 of the token text. A rotated token
-- has used_at set and names its only child; the child row points back.
CREATE TABLE refresh_tokens (
    token_hash   bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    session_id   uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    parent_hash  bytea UNIQUE,                 -- one child per parent, enforced
    issued_at    timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,         -- min(idle expiry, session expiry)
    used_at      timestamptz,
    child_hash   bytea,
    CHECK ((used_at IS NULL) = (child_hash IS NULL))
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Security events: what operators read to see logins and theft.
CREATE TABLE security_events (
    id          bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    kind        text NOT NULL,
    subject     text,
    session_id  uuid,
    peer        text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_occurred_at ON security_events (occurred_at);
