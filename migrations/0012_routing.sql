-- Routing. The dispatcher places each task on one worker (model affinity, capabilities, a
-- bounded prefetch): `tasks.worker` names it from `queued` on. What a worker can do and what
-- its model cache holds arrive in its heartbeats and are kept as one JSON document.
ALTER TABLE workers ADD COLUMN state jsonb NOT NULL DEFAULT '{}';
ALTER TABLE workers ADD COLUMN model_loads bigint NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN draining boolean NOT NULL DEFAULT false;
CREATE INDEX tasks_placed ON tasks (worker) WHERE status IN ('queued', 'running');

-- Weighted fair share: a tenant of weight 2 gets two turns for every turn of a tenant of
-- weight 1. Tenants without a row weigh 1.
CREATE TABLE tenant_shares (
    tenant text PRIMARY KEY,
    weight double precision NOT NULL CHECK (weight > 0 AND weight <= 1000)
);
