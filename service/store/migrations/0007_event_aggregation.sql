-- Repeated security events (what a client can trigger cheaply and at will: throttled
-- or failed logins, replays of rotated refresh tokens, refused admin calls) share one
-- row per kind, aggregation key and time window: a count and the first and last time,
-- so that a flood of them cannot grow the table at will. Other events keep one row
-- each (aggregate_key NULL, occurrences 1).
ALTER TABLE security_events
    ADD COLUMN occurrences      bigint NOT NULL DEFAULT 1,
    ADD COLUMN last_occurred_at timestamptz,        -- NULL: the same as occurred_at
    ADD COLUMN aggregate_key    text,               -- a digest of the event's source and key
    ADD COLUMN aggregate_window timestamptz;        -- start of the window it counts in
CREATE UNIQUE INDEX security_events_aggregate
    ON security_events (kind, aggregate_key, aggregate_window)
    WHERE aggregate_key IS NOT NULL;

-- Who made a session's latest rotation: a replay of the rotated token within the grace
-- window from another address is told from a client's own retry.
ALTER TABLE sessions ADD COLUMN last_refreshed_peer text;
