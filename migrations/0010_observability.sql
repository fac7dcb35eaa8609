-- The dashboard's images-per-minute chart and the webhook scan read finished tasks and jobs by
-- time.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_webhook_finished ON jobs (finished_at)
    WHERE finished_at IS NOT NULL AND spec ? 'webhook_url';

-- One row per job end that has a webhook to call. A job that ends again (after Retry failed)
-- gets another row. Coordinators claim due rows with FOR UPDATE SKIP LOCKED, so each delivery
-- attempt is made by one of them.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    job_id           uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    job_finished_at  timestamptz NOT NULL,
    url              text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    response_status  integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (job_id, job_finished_at)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
