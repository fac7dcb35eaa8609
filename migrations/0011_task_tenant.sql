-- Fair share picks each tenant's next pending tasks; a tenant column on tasks lets it do so
-- with one index scan per tenant instead of walking other tenants' tasks.
ALTER TABLE tasks ADD COLUMN tenant text NOT NULL DEFAULT 'default';
UPDATE tasks t SET tenant = j.tenant FROM jobs j WHERE j.id = t.job_id AND t.tenant <> j.tenant;
CREATE INDEX tasks_pending_tenant ON tasks (tenant, priority DESC, created_at, job_id, idx)
    WHERE status = 'pending';
