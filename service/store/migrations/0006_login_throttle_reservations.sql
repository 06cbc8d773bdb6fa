-- Login attempts are counted before their password is checked (a reservation), so
-- that concurrent guesses cannot all pass the allowance check and a guess whose
-- caller goes away is still counted. `failures` now includes the attempts still
-- being checked; `pending` is how many those are (as of `pending_at`, the latest
-- reservation: a count left behind by a crashed process is ignored after a minute).
ALTER TABLE login_throttle ADD COLUMN pending integer NOT NULL DEFAULT 0;
ALTER TABLE login_throttle ADD COLUMN pending_at timestamptz;
