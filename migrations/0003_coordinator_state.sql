-- Facts the coordinators share, e.g. which Redis server (run_id) the queued tasks were
-- handed to: when it changes, Redis restarted and lost them.
CREATE TABLE coordinator_state (
    key    text PRIMARY KEY,
    value  text NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
