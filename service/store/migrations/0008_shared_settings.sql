-- The settings every replica on this database must share (AUTH_ISSUER, AUTH_SIGNING_ALG,
-- lifetimes, ...: SHARED_SETTINGS in service/domain/shared_settings.py), one row each,
-- recorded by the first `authsvc serve` and compared by every later one; changed only by
-- `authsvc settings adopt`. Empty at first: existing deployments record theirs on their
-- next start.
CREATE TABLE shared_settings (
    name        text PRIMARY KEY,       -- a Settings field name, e.g. 'issuer'
    value       jsonb NOT NULL,
    recorded_at timestamptz NOT NULL
);
