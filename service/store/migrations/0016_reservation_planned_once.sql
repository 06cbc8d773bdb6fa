-- The login throttle's reservation (`reserve_login_attempt`, migrations 0013 and 0015)
-- reads the rows it has just locked: `SELECT array_agg(t ..) FROM login_throttle AS t
-- WHERE t.key = ANY(p_keys)`. PL/pgSQL keeps each statement's plan for the connection, but
-- for this one the planner always found a plan made for the call's own keys cheaper than
-- the kept generic one, and so planned the statement anew on every login (pg_stat_statements:
-- as many plans as calls, ~100 µs of planning a login, about 6 % of PostgreSQL's CPU for a
-- login). The function's other statements were planned once a connection already, so this
-- changes the one statement: its plan (the key's index for a few keys) does not depend on
-- which keys. What the function decides and writes is unchanged; older replicas call it
-- as before.
ALTER FUNCTION reserve_login_attempt(text[], timestamptz, timestamptz, integer[], timestamptz[], text)
    SET plan_cache_mode = force_generic_plan;
