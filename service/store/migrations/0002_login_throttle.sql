-- Brute-force throttling of failed logins, shared by every replica.
-- One row per throttled key: 'user:<username>' or 'peer:<address>'.
CREATE TABLE login_throttle (
    key             text PRIMARY KEY,
    failures        integer NOT NULL,
    last_failure_at timestamptz NOT NULL,
    locked_until    timestamptz
);
CREATE INDEX login_throttle_last_failure_at ON login_throttle (last_failure_at);
