-- The farm's system of record. Only farm-coordinator reads or writes these tables.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant           text        NOT NULL DEFAULT 'default',
    idempotency_key  text,
    spec             jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         integer     NOT NULL DEFAULT 0,
    tasks_total      integer     NOT NULL CHECK (tasks_total > 0),
    tasks_succeeded  integer     NOT NULL DEFAULT 0,
    tasks_failed     integer     NOT NULL DEFAULT 0,
    tasks_cancelled  integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (tenant, idempotency_key)
);

CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC, id DESC);

CREATE TABLE tasks (
    job_id          uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx             integer     NOT NULL CHECK (idx >= 0),
    -- The u64 seed, bit-cast to bigint (seeds >= 2^63 are stored negative).
    seed            bigint      NOT NULL,
    prompt          text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority        integer     NOT NULL DEFAULT 0,
    -- The current attempt; 0 until first dispatched. Events for any other attempt are ignored.
    attempt         integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL CHECK (max_attempts > 0),
    lease_deadline  timestamptz,
    stream_id       text,
    worker          text,
    object_key      text,
    sha256          text,
    size_bytes      bigint,
    error           text,
    load_ms         bigint,
    render_ms       bigint,
    upload_ms       bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    queued_at       timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, idx),
    CHECK (status <> 'succeeded' OR (object_key IS NOT NULL AND sha256 IS NOT NULL))
);

-- The dispatcher's pick order.
CREATE INDEX tasks_pending ON tasks (priority DESC, created_at, job_id, idx) WHERE status = 'pending';
-- The reaper's scan.
CREATE INDEX tasks_leased ON tasks (lease_deadline) WHERE status IN ('queued', 'running');
-- WatchJob's change feed.
CREATE INDEX tasks_updated ON tasks (job_id, updated_at);

CREATE TABLE workers (
    id            text PRIMARY KEY,
    hostname      text        NOT NULL,
    device        text        NOT NULL,
    concurrency   integer     NOT NULL,
    running       integer     NOT NULL DEFAULT 0,
    models        text[]      NOT NULL DEFAULT '{}',
    tasks_done    bigint      NOT NULL DEFAULT 0,
    tasks_failed  bigint      NOT NULL DEFAULT 0,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now()
);
