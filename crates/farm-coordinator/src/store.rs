//! The Postgres store: the only code in the farm that touches SQL.
//!
//! Every task transition is a single `UPDATE ... WHERE attempt = $n AND status IN (...)`, so an
//! event from a superseded attempt, or a duplicate, matches no row and changes nothing.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use farm_core::{Attempt, JobId, JobSpec, JobStatus, TaskRef, TaskStatus, WorkerId};
use farm_queue::{Event, WorkerInfo};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A statement that updates a batch of tasks named in arrays (`unnest`), planned afresh for
/// each run. Postgres caches a generic plan for a prepared statement after a few runs, built
/// from the table's size and statistics at that moment: plans made while the tasks table was
/// nearly empty walked every pending task for each task in the batch once a bulk job was
/// submitted (a claim of 200 tasks took seconds). An unnamed statement is planned with its
/// arguments each time; the planning is cheap next to such a plan.
fn batch_query(sql: &str) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).persistent(false)
}

/// The tenant of every job until API tokens exist.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("postgres: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("tenant {tenant:?} has {unfinished} unfinished tasks; {requested} more would exceed its quota of {limit}")]
    Quota {
        tenant: String,
        unfinished: u64,
        requested: u64,
        limit: u64,
    },
}

impl StoreError {
    /// True when the database could not be reached (as opposed to a bad query).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { .. } => true,
            StoreError::Sql(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: JobId,
    pub tenant: String,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub tasks_total: u32,
    pub tasks_succeeded: u32,
    pub tasks_failed: u32,
    pub tasks_cancelled: u32,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct TaskRow {
    pub index: u32,
    pub seed: u64,
    pub prompt: String,
    pub status: TaskStatus,
    pub attempt: u32,
    pub worker: Option<String>,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub size_bytes: Option<u64>,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub info: WorkerInfo,
    pub running: u32,
    pub last_seen: DateTime<Utc>,
    /// How long ago `last_seen` was, by the database's clock.
    pub silent_for: Duration,
    pub online: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TaskCounts {
    pub pending: u64,
    pub queued: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// A task the dispatcher just moved to `queued`.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task: TaskRef,
    pub attempt: Attempt,
    /// The worker it was placed on (`None` only for [`Store::claim_for_dispatch`]).
    pub worker: Option<WorkerId>,
}

/// A pending task in dispatch order, and how long ago it was submitted.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub task: TaskRef,
    pub waited: Duration,
}

/// How many unfinished tasks of one job sit on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub worker: WorkerId,
    pub job: JobId,
    pub tasks: u32,
}

/// A queued task taken back from a worker that left.
#[derive(Debug, Clone)]
pub struct Departed {
    pub task: TaskRef,
    pub worker: WorkerId,
    pub stream_id: Option<String>,
}

/// How long a task waits before its effective priority rises by one (see
/// [`Store::candidates`]), unless the coordinator is told otherwise.
pub const DEFAULT_AGEING: Duration = Duration::from_secs(60);

/// A task whose lease expired, as the reaper left it.
#[derive(Debug, Clone)]
pub struct Reaped {
    pub task: TaskRef,
    pub status: TaskStatus,
    pub stream_id: Option<String>,
    /// The worker it was placed on, whose stream carried `stream_id`.
    pub worker: Option<WorkerId>,
}

/// Which task rows an event batch changed, for watchers.
#[derive(Debug, Default)]
pub struct Applied {
    pub changed: Vec<TaskRef>,
    pub ignored: usize,
}

/// A worker is online while its heartbeats are younger than this.
pub const WORKER_ONLINE_SECS: i64 = 15;

/// The hex SHA-256 of a token: what the database keeps instead of the token.
pub fn token_digest(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn seed_to_db(seed: u64) -> i64 {
    seed as i64
}

fn seed_from_db(seed: i64) -> u64 {
    seed as u64
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to `url`, creating the database if it does not exist, and applies migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let connect_err = |source| StoreError::Connect {
            url: farm_core::redact_url(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
        let options = options.log_statements(tracing::log::LevelFilter::Trace);
        let database = options.get_database().unwrap_or("postgres").to_string();
        let pool_opts = || {
            PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
        };
        let pool = match pool_opts().connect_with(options.clone()).await {
            Ok(pool) => pool,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                // 3D000: invalid_catalog_name, the database does not exist yet.
                let admin = pool_opts()
                    .max_connections(1)
                    .connect_with(options.clone().database("postgres"))
                    .await
                    .map_err(connect_err)?;
                let quoted = database.replace('"', "\"\"");
                match sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
                    .execute(&admin)
                    .await
                {
                    Ok(_) => {}
                    // 42P04: duplicate_database, someone else created it meanwhile.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                    Err(e) => return Err(connect_err(e)),
                }
                admin.close().await;
                pool_opts()
                    .connect_with(options)
                    .await
                    .map_err(connect_err)?
            }
            Err(e) => return Err(connect_err(e)),
        };
        let store = Store { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Drops the database `url` names, disconnecting its sessions.
    pub async fn drop_database(url: &str) -> Result<()> {
        let connect_err = |source| StoreError::Connect {
            url: farm_core::redact_url(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
        let database = options
            .get_database()
            .unwrap_or_default()
            .replace('"', "\"\"");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.database("postgres"))
            .await
            .map_err(connect_err)?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .execute(&admin)
        .await?;
        admin.close().await;
        Ok(())
    }

    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Writes the job and all its tasks in one transaction. With an idempotency key already
    /// used by this tenant, writes nothing and returns the existing job (`created` false).
    pub async fn submit(&self, spec: &JobSpec, tenant: &str) -> Result<(JobRow, bool)> {
        self.submit_with_quota(spec, tenant, None).await
    }

    /// [`Store::submit`], refusing the job when the tenant's unfinished tasks plus this job's
    /// would exceed `quota`. Submits of one tenant are serialized by an advisory lock so the
    /// check cannot race.
    pub async fn submit_with_quota(
        &self,
        spec: &JobSpec,
        tenant: &str,
        quota: Option<u64>,
    ) -> Result<(JobRow, bool)> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = quota {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('farm-quota:' || $1))")
                .bind(tenant)
                .execute(&mut *tx)
                .await?;
            let unfinished: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(tasks_total - tasks_succeeded - tasks_failed - tasks_cancelled), 0)::bigint
                 FROM jobs WHERE tenant = $1 AND status IN ('pending', 'running')",
            )
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
            let requested = u64::from(spec.tasks_total());
            let unfinished = unfinished.max(0) as u64;
            let repeat = match spec.idempotency_key.as_deref() {
                Some(key) => sqlx::query_scalar::<_, Uuid>(
                    "SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
                )
                .bind(tenant)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?
                .is_some(),
                None => false,
            };
            if !repeat && unfinished + requested > limit {
                return Err(StoreError::Quota {
                    tenant: tenant.to_string(),
                    unfinished,
                    requested,
                    limit,
                });
            }
        }
        let id = JobId::new();
        let spec_json =
            serde_json::to_value(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, tenant, idempotency_key, spec, priority, tasks_total)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, idempotency_key) DO NOTHING
             RETURNING id, tenant, status, tasks_total, tasks_succeeded, tasks_failed,
                       tasks_cancelled, created_at, finished_at",
        )
        .bind(id.0)
        .bind(tenant)
        .bind(spec.idempotency_key.as_deref())
        .bind(&spec_json)
        .bind(spec.priority)
        .bind(spec.tasks_total() as i32)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(inserted) = inserted else {
            tx.rollback().await?;
            let existing: Uuid = sqlx::query_scalar(
                "SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
            )
            .bind(tenant)
            .bind(spec.idempotency_key.as_deref())
            .fetch_one(&self.pool)
            .await?;
            let job = self
                .job(JobId(existing))
                .await?
                .ok_or_else(|| StoreError::Corrupt("idempotent job vanished".into()))?;
            return Ok((job, false));
        };
        // The row as written, with the spec we hold (not read back: it can be large).
        let job = job_with_spec(&inserted, spec.clone())?;
        let n = spec.tasks_total() as usize;
        let mut idx = Vec::with_capacity(n);
        let mut seeds = Vec::with_capacity(n);
        let mut prompts = Vec::with_capacity(n);
        for (i, prompt, seed) in spec.tasks() {
            idx.push(i as i32);
            seeds.push(seed_to_db(seed));
            prompts.push(prompt);
        }
        sqlx::query(
            "INSERT INTO tasks (job_id, idx, seed, prompt, priority, max_attempts, tenant)
             SELECT $1, u.i, u.s, u.p, $5, $6, $7
             FROM unnest($2::int[], $3::bigint[], $4::text[]) AS u(i, s, p)",
        )
        .bind(id.0)
        .bind(&idx)
        .bind(&seeds)
        .bind(&prompts)
        .bind(spec.priority)
        .bind(spec.max_attempts as i32)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((job, true))
    }

    pub async fn job(&self, id: JobId) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!("{JOB_COLUMNS} WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// The job, if `tenant` may see it (`None`: an admin, who sees every job). Another
    /// tenant's job is reported as absent, exactly like a job that does not exist.
    pub async fn visible_job(&self, id: JobId, tenant: Option<&str>) -> Result<Option<JobRow>> {
        Ok(self
            .job(id)
            .await?
            .filter(|job| tenant.is_none_or(|t| t == job.tenant)))
    }

    /// Jobs newest first; `after` is the (created_at, id) of the last job of the previous page;
    /// `tenant` limits the list to one tenant's jobs.
    pub async fn list_jobs(
        &self,
        tenant: Option<&str>,
        status: Option<JobStatus>,
        limit: u32,
        after: Option<(DateTime<Utc>, Uuid)>,
    ) -> Result<Vec<JobRow>> {
        let (after_ts, after_id) = match after {
            Some((ts, id)) => (Some(ts), Some(id)),
            None => (None, None),
        };
        let rows = sqlx::query(&format!(
            "{JOB_COLUMNS}
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
               AND ($5::text IS NULL OR tenant = $5)
             ORDER BY created_at DESC, id DESC
             LIMIT $4"
        ))
        .bind(status.map(|s| s.as_str()))
        .bind(after_ts)
        .bind(after_id)
        .bind(i64::from(limit))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn tasks(&self, job: JobId) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(&format!("{TASK_COLUMNS} WHERE job_id = $1 ORDER BY idx"))
            .bind(job.0)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    pub async fn task(&self, task: TaskRef) -> Result<Option<TaskRow>> {
        let row = sqlx::query(&format!("{TASK_COLUMNS} WHERE job_id = $1 AND idx = $2"))
            .bind(task.job.0)
            .bind(task.index as i32)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    /// Tasks of `job` changed after `since`, oldest change first.
    pub async fn tasks_changed_since(
        &self,
        job: JobId,
        since: DateTime<Utc>,
    ) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(&format!(
            "{TASK_COLUMNS} WHERE job_id = $1 AND updated_at > $2 ORDER BY updated_at, idx"
        ))
        .bind(job.0)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Cancels a job and every unfinished task of it. Returns `None` for an unknown job; a job
    /// that already ended is returned unchanged.
    pub async fn cancel(&self, job: JobId) -> Result<Option<JobRow>> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(job.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Ok(None);
        };
        let status =
            JobStatus::from_str(&status).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !status.is_terminal() {
            let cancelled = sqlx::query(
                "UPDATE tasks SET status = 'cancelled', lease_deadline = NULL, finished_at = now(),
                        updated_at = clock_timestamp()
                 WHERE job_id = $1 AND status IN ('pending', 'queued', 'running')",
            )
            .bind(job.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = now(),
                        tasks_cancelled = tasks_cancelled + $2
                 WHERE id = $1",
            )
            .bind(job.0)
            .bind(cancelled as i32)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.job(job).await
    }

    /// Moves up to `limit` pending tasks (highest priority first, then taking turns between
    /// tenants, then oldest) to `queued`
    /// with the next attempt number and a lease of `lease`. Several coordinators may call this
    /// at once: `SKIP LOCKED` gives each its own tasks.
    /// Pending tasks in dispatch order, not claimed: the dispatcher places them on workers,
    /// then claims those it placed with [`Store::claim`].
    ///
    /// The order: effective priority first, then turns. A task's effective priority is its
    /// priority plus one for every `ageing` it waited, capped at the highest priority pending,
    /// so old low-priority work is not starved behind a stream of urgent work, yet tasks of
    /// one class still share fairly. Within a class each tenant's tasks are numbered in its own
    /// order (its n-th task is its turn n) and turns are divided by the tenant's weight
    /// (`tenant_shares`), so a tenant of weight 2 gets two tasks for every one of a tenant of
    /// weight 1, and a small tenant is never starved behind a bulk job.
    pub async fn candidates(&self, limit: u32, ageing: Duration) -> Result<Vec<Candidate>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "WITH classes AS (
                SELECT DISTINCT tenant, priority FROM jobs WHERE status IN ('pending', 'running')
             ),
             top AS (SELECT max(priority) AS p FROM classes),
             cand AS (
                -- Each (tenant, priority class)'s oldest pending tasks: one index scan each.
                SELECT c.* FROM classes cl
                CROSS JOIN LATERAL (
                    SELECT k.job_id, k.idx, k.tenant, k.priority, k.created_at
                    FROM tasks k
                    WHERE k.tenant = cl.tenant AND k.priority = cl.priority AND k.status = 'pending'
                    ORDER BY k.created_at, k.job_id, k.idx
                    LIMIT $1
                ) c
             ),
             aged AS (
                SELECT cand.*, least(
                    cand.priority + floor(extract(epoch FROM now() - cand.created_at) / $2)::int,
                    greatest(cand.priority, (SELECT p FROM top))
                ) AS effective
                FROM cand
             ),
             turned AS (
                SELECT aged.*, row_number() OVER (
                    PARTITION BY tenant ORDER BY effective DESC, created_at, job_id, idx
                ) AS turn
                FROM aged
             )
             SELECT t.job_id, t.idx, extract(epoch FROM now() - t.created_at)::float8 AS waited
             FROM turned t
             LEFT JOIN tenant_shares s ON s.tenant = t.tenant
             ORDER BY t.effective DESC, t.turn / coalesce(s.weight, 1), t.created_at, t.job_id, t.idx
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .bind(ageing.as_secs_f64().max(0.001))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let waited: f64 = r.try_get("waited")?;
                Ok(Candidate {
                    task: task_ref(r)?,
                    waited: Duration::from_secs_f64(waited.max(0.0)),
                })
            })
            .collect()
    }

    /// Claims placed tasks: `pending` → `queued` with a new attempt, on worker `workers[i]`
    /// (`None`: not placed yet). A task another coordinator claimed first is skipped, so no
    /// task is dispatched twice. Returns what was claimed.
    pub async fn claim(
        &self,
        tasks: &[TaskRef],
        workers: &[Option<WorkerId>],
        lease: Duration,
    ) -> Result<Vec<Claimed>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<Uuid> = tasks.iter().map(|t| t.job.0).collect();
        let idx: Vec<i32> = tasks.iter().map(|t| t.index as i32).collect();
        let names: Vec<Option<&str>> = workers
            .iter()
            .map(|w| w.as_ref().map(|w| w.0.as_str()))
            .collect();
        let rows = batch_query(
            "UPDATE tasks t
             SET status = 'queued', attempt = t.attempt + 1, queued_at = now(), worker = u.w,
                 lease_deadline = now() + make_interval(secs => $4), stream_id = NULL,
                 updated_at = clock_timestamp()
             FROM unnest($1::uuid[], $2::int[], $3::text[]) AS u(j, i, w)
             WHERE t.job_id = u.j AND t.idx = u.i AND t.status = 'pending'
             RETURNING t.job_id, t.idx, t.attempt, t.worker",
        )
        .bind(&jobs)
        .bind(&idx)
        .bind(&names)
        .bind(secs(lease))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Claimed {
                    task: task_ref(r)?,
                    attempt: Attempt(r.try_get::<i32, _>("attempt")? as u32),
                    worker: r.try_get::<Option<String>, _>("worker")?.map(WorkerId),
                })
            })
            .collect()
    }

    /// The next `limit` tasks in dispatch order ([`Store::candidates`]), claimed for no
    /// particular worker.
    pub async fn claim_for_dispatch(&self, limit: u32, lease: Duration) -> Result<Vec<Claimed>> {
        let tasks: Vec<TaskRef> = self
            .candidates(limit, DEFAULT_AGEING)
            .await?
            .into_iter()
            .map(|c| c.task)
            .collect();
        let mut claimed = self.claim(&tasks, &vec![None; tasks.len()], lease).await?;
        // Keep the dispatch order (UPDATE ... RETURNING does not).
        let order: std::collections::HashMap<TaskRef, usize> =
            tasks.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        claimed.sort_by_key(|c| order.get(&c.task).copied().unwrap_or(usize::MAX));
        Ok(claimed)
    }

    /// Tasks placed on each worker and not finished (`queued` or `running`), counted per job.
    /// Only `tasks` is read (the `tasks_leased` index and the rows it points at): the caller
    /// knows each job's model from the specs it dispatched, and reading `jobs.spec` here would
    /// unpack every job's seed list on every dispatch round.
    pub async fn placed(&self) -> Result<Vec<Placed>> {
        let rows = sqlx::query(
            "SELECT worker, job_id, count(*) AS n FROM tasks
             WHERE status IN ('queued', 'running') AND worker IS NOT NULL
             GROUP BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Placed {
                    worker: WorkerId(r.try_get("worker")?),
                    job: JobId(r.try_get("job_id")?),
                    tasks: r.try_get::<i64, _>("n")? as u32,
                })
            })
            .collect()
    }

    /// Sends `queued` tasks placed on a worker that is gone (no heartbeat for `gone_after`;
    /// the reaper uses [`WORKER_ONLINE_SECS`]) back to `pending`, without waiting for the
    /// queue lease. (A draining worker releases its unstarted tasks itself.) Returns each task
    /// with its worker and stream id, to retract the messages.
    pub async fn requeue_from_departed(&self, gone_after: Duration) -> Result<Vec<Departed>> {
        let rows = sqlx::query(
            "WITH gone AS (
                SELECT id FROM workers WHERE last_seen < now() - make_interval(secs => $1)
             ),
             old AS (
                SELECT t.job_id, t.idx, t.worker, t.stream_id FROM tasks t
                WHERE t.status = 'queued' AND t.worker IN (SELECT id FROM gone)
                FOR UPDATE OF t SKIP LOCKED
             )
             UPDATE tasks t SET status = 'pending', lease_deadline = NULL, stream_id = NULL,
                    worker = NULL, updated_at = clock_timestamp(),
                    error = format('attempt %s: its worker %s left before starting it', t.attempt, old.worker)
             FROM old
             WHERE t.job_id = old.job_id AND t.idx = old.idx AND t.status = 'queued'
             RETURNING t.job_id, t.idx, old.worker, old.stream_id",
        )
        .bind(secs(gone_after))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Departed {
                    task: task_ref(r)?,
                    worker: WorkerId(r.try_get("worker")?),
                    stream_id: r.try_get("stream_id")?,
                })
            })
            .collect()
    }

    /// Workers whose heartbeats stopped at least `WORKER_ONLINE_SECS` ago, newest first, with
    /// no task left `queued` or `running` on them: their streams can go.
    pub async fn departed_workers(&self) -> Result<Vec<WorkerId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT w.id FROM workers w
             WHERE w.last_seen < now() - make_interval(secs => $1)
               AND w.last_seen > now() - interval '2 minutes'
               AND NOT EXISTS (SELECT 1 FROM tasks t
                               WHERE t.worker = w.id AND t.status IN ('queued', 'running'))",
        )
        .bind(WORKER_ONLINE_SECS as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(WorkerId).collect())
    }

    /// Sets a tenant's fair-share weight (1 is everyone's default).
    pub async fn set_tenant_weight(&self, tenant: &str, weight: f64) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenant_shares (tenant, weight) VALUES ($1, $2)
             ON CONFLICT (tenant) DO UPDATE SET weight = $2",
        )
        .bind(tenant)
        .bind(weight)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Remembers which stream entry carries each dispatched attempt (to retract it later).
    pub async fn set_stream_ids(&self, claimed: &[Claimed], ids: &[String]) -> Result<()> {
        let jobs: Vec<Uuid> = claimed.iter().map(|c| c.task.job.0).collect();
        let idx: Vec<i32> = claimed.iter().map(|c| c.task.index as i32).collect();
        let attempts: Vec<i32> = claimed.iter().map(|c| c.attempt.0 as i32).collect();
        batch_query(
            "UPDATE tasks t SET stream_id = u.sid
             FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[]) AS u(j, i, a, sid)
             WHERE t.job_id = u.j AND t.idx = u.i AND t.attempt = u.a",
        )
        .bind(&jobs)
        .bind(&idx)
        .bind(&attempts)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Puts claimed tasks back to `pending` (their dispatch failed before reaching Redis).
    pub async fn unclaim(&self, claimed: &[Claimed]) -> Result<()> {
        let jobs: Vec<Uuid> = claimed.iter().map(|c| c.task.job.0).collect();
        let idx: Vec<i32> = claimed.iter().map(|c| c.task.index as i32).collect();
        let attempts: Vec<i32> = claimed.iter().map(|c| c.attempt.0 as i32).collect();
        batch_query(
            "UPDATE tasks t SET status = 'pending', attempt = t.attempt - 1, lease_deadline = NULL,
                    updated_at = clock_timestamp()
             FROM unnest($1::uuid[], $2::int[], $3::int[]) AS u(j, i, a)
             WHERE t.job_id = u.j AND t.idx = u.i AND t.attempt = u.a AND t.status = 'queued'",
        )
        .bind(&jobs)
        .bind(&idx)
        .bind(&attempts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn job_specs(&self, jobs: &[JobId]) -> Result<Vec<(JobId, JobSpec)>> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
        let rows = sqlx::query("SELECT id, spec FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let spec: serde_json::Value = r.try_get("spec")?;
                let spec =
                    serde_json::from_value(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((JobId(r.try_get("id")?), spec))
            })
            .collect()
    }

    /// (slots of online workers, tasks queued, tasks running).
    pub async fn capacity(&self) -> Result<(u64, u64, u64)> {
        let slots: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(concurrency), 0)::bigint FROM workers
             WHERE last_seen > now() - make_interval(secs => $1)",
        )
        .bind(WORKER_ONLINE_SECS as f64)
        .fetch_one(&self.pool)
        .await?;
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
                    count(*) FILTER (WHERE status = 'running') AS running
             FROM tasks WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            slots as u64,
            row.try_get::<i64, _>("queued")? as u64,
            row.try_get::<i64, _>("running")? as u64,
        ))
    }

    /// Applies a batch of worker events in one transaction. Each task transition is fenced by
    /// attempt and by the states it may come from; job counters are updated once per job, in
    /// job-id order (so concurrent coordinators cannot deadlock on them).
    pub async fn apply(&self, events: &[Event], run_lease: Duration) -> Result<Applied> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.apply_once(events, run_lease).await {
                // 40P01 deadlock_detected, 40001 serialization_failure: retry the batch.
                Err(StoreError::Sql(sqlx::Error::Database(e)))
                    if tries < 4
                        && matches!(e.code().as_deref(), Some("40P01") | Some("40001")) =>
                {
                    tracing::warn!(error = %e, "event batch conflicted; retrying");
                }
                other => return other,
            }
        }
    }

    async fn apply_once(&self, events: &[Event], run_lease: Duration) -> Result<Applied> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Applied::default();
        let mut deltas = Deltas::new();
        // `started` and `succeeded` events are applied set-based after the loop, one
        // statement each for the whole batch (they are most of the traffic). Heartbeats and
        // failures are applied first, in order; every transition stays fenced by attempt and
        // by its source states, so the order within a batch does not change the outcome.
        let mut started: Vec<&Event> = Vec::new();
        let mut succeeded: Vec<&Event> = Vec::new();
        for event in events {
            match event {
                Event::Started { .. } => started.push(event),
                Event::Progress { .. } => {}
                Event::Succeeded { .. } => succeeded.push(event),
                Event::Failed {
                    task,
                    attempt,
                    worker,
                    error,
                    retryable,
                } => {
                    let status: Option<String> = sqlx::query_scalar(
                        "UPDATE tasks SET
                                status = CASE WHEN $5 AND attempt < max_attempts THEN 'pending' ELSE 'failed' END,
                                finished_at = CASE WHEN $5 AND attempt < max_attempts THEN NULL ELSE now() END,
                                worker = $4, error = $6, lease_deadline = NULL,
                                updated_at = clock_timestamp()
                         WHERE job_id = $1 AND idx = $2 AND attempt = $3
                           AND status IN ('queued', 'running')
                         RETURNING status",
                    )
                    .bind(task.job.0)
                    .bind(task.index as i32)
                    .bind(attempt.0 as i32)
                    .bind(&worker.0)
                    .bind(*retryable)
                    .bind(format!("attempt {attempt} on {worker}: {error}"))
                    .fetch_optional(&mut *tx)
                    .await?;
                    match status.as_deref() {
                        Some(s) => {
                            let d = deltas.entry(task.job.0).or_default();
                            if s == "failed" {
                                d.1 += 1;
                            }
                            applied.changed.push(*task);
                            sqlx::query(
                                "UPDATE workers SET tasks_failed = tasks_failed + 1 WHERE id = $1",
                            )
                            .bind(&worker.0)
                            .execute(&mut *tx)
                            .await?;
                        }
                        None => applied.ignored += 1,
                    }
                }
                Event::Heartbeat(info) => {
                    upsert_worker(&mut tx, info).await?;
                    extend_leases(&mut tx, &info.running, run_lease).await?;
                }
                Event::Released {
                    task,
                    attempt,
                    worker,
                } => {
                    // Only the worker it was placed on can give it back, and only unstarted.
                    let released = sqlx::query(
                        "UPDATE tasks SET status = 'pending', attempt = attempt - 1, worker = NULL,
                                stream_id = NULL, lease_deadline = NULL,
                                updated_at = clock_timestamp()
                         WHERE job_id = $1 AND idx = $2 AND attempt = $3 AND status = 'queued'
                           AND worker = $4",
                    )
                    .bind(task.job.0)
                    .bind(task.index as i32)
                    .bind(attempt.0 as i32)
                    .bind(&worker.0)
                    .execute(&mut *tx)
                    .await?;
                    if released.rows_affected() == 1 {
                        applied.changed.push(*task);
                    } else {
                        applied.ignored += 1;
                    }
                }
            }
        }
        apply_started(&mut tx, &started, run_lease, &mut applied, &mut deltas).await?;
        apply_succeeded(&mut tx, &succeeded, &mut applied, &mut deltas).await?;
        for (job, (succeeded, failed)) in deltas {
            bump_job(&mut tx, job, succeeded, failed).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Sends tasks whose lease expired back to `pending` (or to `failed` when they used all
    /// their attempts, keeping the reason). Returns what it changed.
    pub async fn reap_expired(&self, limit: u32) -> Result<Vec<Reaped>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "WITH expired AS (
                SELECT job_id, idx FROM tasks
                WHERE status IN ('queued', 'running') AND lease_deadline < now()
                ORDER BY lease_deadline
                LIMIT $1
                FOR UPDATE SKIP LOCKED
             ),
             old AS (
                SELECT t.job_id, t.idx, t.stream_id AS old_stream_id, t.worker AS old_worker
                FROM tasks t JOIN expired USING (job_id, idx)
             )
             UPDATE tasks t SET
                status = CASE WHEN t.attempt < t.max_attempts THEN 'pending' ELSE 'failed' END,
                finished_at = CASE WHEN t.attempt < t.max_attempts THEN NULL ELSE now() END,
                error = format('attempt %s: lease expired while %s%s', t.attempt, t.status,
                               coalesce(' on ' || t.worker, '')),
                lease_deadline = NULL, stream_id = NULL, updated_at = clock_timestamp()
             FROM old
             WHERE t.job_id = old.job_id AND t.idx = old.idx
             RETURNING t.job_id, t.idx, t.status, old.old_stream_id, old.old_worker",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut reaped = Vec::with_capacity(rows.len());
        let mut failed: BTreeMap<Uuid, i32> = BTreeMap::new();
        for r in &rows {
            let job: Uuid = r.try_get("job_id")?;
            let status: String = r.try_get("status")?;
            let status =
                TaskStatus::from_str(&status).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if status == TaskStatus::Failed {
                *failed.entry(job).or_default() += 1;
            }
            reaped.push(Reaped {
                task: TaskRef {
                    job: JobId(job),
                    index: r.try_get::<i32, _>("idx")? as u32,
                },
                status,
                stream_id: r.try_get("old_stream_id")?,
                worker: r.try_get::<Option<String>, _>("old_worker")?.map(WorkerId),
            });
        }
        for (job, n) in failed {
            bump_job(&mut tx, job, 0, n).await?;
        }
        tx.commit().await?;
        Ok(reaped)
    }

    /// Sends back to `pending` the tasks marked `queued` more than `older_than` ago that never
    /// got a stream id: their claim committed but the dispatcher never learned it (the
    /// connection died with the answer) or never reached Redis. Without this they would wait
    /// for the whole queue lease. A message that did go out is fenced off by the new attempt.
    pub async fn requeue_unsent(&self, older_than: Duration) -> Result<Vec<TaskRef>> {
        let rows = sqlx::query(
            "UPDATE tasks SET status = 'pending', lease_deadline = NULL,
                    error = format('attempt %s: its dispatch was never confirmed', attempt),
                    updated_at = clock_timestamp()
             WHERE status = 'queued' AND stream_id IS NULL
               AND queued_at < now() - make_interval(secs => $1)
             RETURNING job_id, idx",
        )
        .bind(secs(older_than))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_ref).collect()
    }

    pub async fn workers(&self) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query(
            "SELECT id, hostname, device, concurrency, running, models, available, tasks_done, tasks_failed,
                    state, draining, last_seen, last_seen > now() - make_interval(secs => $1) AS online,
                    extract(epoch FROM now() - last_seen)::float8 AS silent_secs
             FROM workers ORDER BY id",
        )
        .bind(WORKER_ONLINE_SECS as f64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: sqlx::types::Json<WorkerState> = r.try_get("state")?;
                let state = state.0;
                Ok(WorkerRow {
                    info: WorkerInfo {
                        worker: farm_core::WorkerId(r.try_get("id")?),
                        hostname: r.try_get("hostname")?,
                        device: r.try_get("device")?,
                        concurrency: r.try_get::<i32, _>("concurrency")? as u32,
                        models: r.try_get("models")?,
                        available: r.try_get("available")?,
                        running: Vec::new(),
                        tasks_done: r.try_get::<i64, _>("tasks_done")? as u64,
                        tasks_failed: r.try_get::<i64, _>("tasks_failed")? as u64,
                        max_batch: state.max_batch.max(1),
                        capabilities: state.capabilities,
                        cache: state.cache,
                        draining: r.try_get("draining")?,
                        batches: state.batches,
                    },
                    running: r.try_get::<i32, _>("running")? as u32,
                    last_seen: r.try_get("last_seen")?,
                    silent_for: Duration::from_secs_f64(
                        r.try_get::<f64, _>("silent_secs")?.max(0.0),
                    ),
                    online: r.try_get("online")?,
                })
            })
            .collect()
    }

    /// Records that the queue is now served by Redis `run_id`. When that differs from the
    /// run_id recorded before, Redis restarted and lost its streams: every task queued before
    /// the new server started (`uptime_secs` ago) goes back to `pending`. Returns how many, or
    /// `None` when nothing changed. Only one coordinator wins the update, so only it requeues.
    pub async fn note_redis_run_id(&self, run_id: &str, uptime_secs: u64) -> Result<Option<u64>> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<String> = sqlx::query_scalar(
            "INSERT INTO coordinator_state (key, value) VALUES ('redis_run_id', $1)
             ON CONFLICT (key) DO UPDATE SET value = $1, at = now()
                 WHERE coordinator_state.value <> $1
             RETURNING (SELECT value FROM coordinator_state WHERE key = 'redis_run_id')",
        )
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        let Some(previous) = previous else {
            // First sighting (nothing to compare) or unchanged.
            tx.commit().await?;
            return Ok(None);
        };
        if previous == run_id {
            tx.commit().await?;
            return Ok(None);
        }
        let requeued = sqlx::query(
            "UPDATE tasks SET status = 'pending', lease_deadline = NULL, stream_id = NULL,
                    error = format('attempt %s: lost when Redis restarted', attempt),
                    updated_at = clock_timestamp()
             WHERE status = 'queued' AND queued_at < now() - make_interval(secs => $1)",
        )
        .bind(uptime_secs as f64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Some(requeued))
    }

    /// Creates an API token for `tenant` and returns it; only its SHA-256 is stored.
    pub async fn create_token(&self, tenant: &str, admin: bool) -> Result<String> {
        let token = format!(
            "farm_{}{}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        );
        sqlx::query("INSERT INTO api_tokens (token_sha256, tenant, admin) VALUES ($1, $2, $3)")
            .bind(token_digest(&token))
            .bind(tenant)
            .bind(admin)
            .execute(&self.pool)
            .await?;
        Ok(token)
    }

    /// Who holds `token`: (tenant, admin), or `None` for an unknown or revoked token.
    pub async fn token_owner(&self, token: &str) -> Result<Option<(String, bool)>> {
        let row = sqlx::query(
            "SELECT tenant, admin FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(token_digest(token))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("tenant")?, r.try_get("admin")?)))
            .transpose()
    }

    pub async fn task_counts(&self) -> Result<TaskCounts> {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut c = TaskCounts::default();
        for r in &rows {
            let n = r.try_get::<i64, _>("n")? as u64;
            match r.try_get::<String, _>("status")?.as_str() {
                "pending" => c.pending = n,
                "queued" => c.queued = n,
                "running" => c.running = n,
                "succeeded" => c.succeeded = n,
                "failed" => c.failed = n,
                "cancelled" => c.cancelled = n,
                _ => {}
            }
        }
        c.oldest_pending = sqlx::query_scalar(&format!(
            "SELECT min(h.created_at) FROM ({PENDING_HEADS}) h"
        ))
        .bind(None::<&str>)
        .fetch_one(&self.pool)
        .await?;
        Ok(c)
    }
}

/// The part of a heartbeat kept as `workers.state`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct WorkerState {
    #[serde(default)]
    max_batch: u32,
    #[serde(default)]
    capabilities: farm_core::Capabilities,
    #[serde(default)]
    cache: farm_queue::CacheState,
    #[serde(default)]
    batches: u64,
}

impl WorkerState {
    fn of(info: &WorkerInfo) -> Self {
        WorkerState {
            max_batch: info.max_batch,
            capabilities: info.capabilities.clone(),
            cache: info.cache.clone(),
            batches: info.batches,
        }
    }
}

async fn upsert_worker(tx: &mut Transaction<'_, Postgres>, info: &WorkerInfo) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, hostname, device, concurrency, running, models, available,
                              state, model_loads, draining, last_seen)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
         ON CONFLICT (id) DO UPDATE SET hostname = $2, device = $3, concurrency = $4,
                running = $5, models = $6, available = $7, state = $8, model_loads = $9,
                draining = $10, last_seen = now()",
    )
    .bind(&info.worker.0)
    .bind(&info.hostname)
    .bind(&info.device)
    .bind(info.concurrency as i32)
    .bind(info.running.len() as i32)
    .bind(&info.models)
    .bind(&info.available)
    .bind(sqlx::types::Json(WorkerState::of(info)))
    .bind(info.cache.loads as i64)
    .bind(info.draining)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// job -> (succeeded delta, failed delta), as `apply_once` collects them; a job whose tasks
/// only started is present with (0, 0), so its status still moves to `running`.
type Deltas = BTreeMap<Uuid, (i32, i32)>;

/// `queued` → `running` for every `started` event of a batch in one statement.
async fn apply_started(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&Event],
    run_lease: Duration,
    applied: &mut Applied,
    deltas: &mut Deltas,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let (mut jobs, mut idx, mut attempts, mut workers) = (vec![], vec![], vec![], vec![]);
    for event in events {
        if let Event::Started {
            task,
            attempt,
            worker,
        } = event
        {
            jobs.push(task.job.0);
            idx.push(task.index as i32);
            attempts.push(attempt.0 as i32);
            workers.push(worker.0.as_str());
        }
    }
    let rows = batch_query(
        "UPDATE tasks t SET status = 'running', worker = u.w, started_at = now(),
                lease_deadline = now() + make_interval(secs => $5),
                updated_at = clock_timestamp()
         FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[]) AS u(j, i, a, w)
         WHERE t.job_id = u.j AND t.idx = u.i AND t.attempt = u.a AND t.status = 'queued'
         RETURNING t.job_id, t.idx",
    )
    .bind(&jobs)
    .bind(&idx)
    .bind(&attempts)
    .bind(&workers)
    .bind(secs(run_lease))
    .fetch_all(&mut **tx)
    .await?;
    applied.ignored += events.len() - rows.len();
    for r in rows {
        let task = task_ref(&r)?;
        deltas.entry(task.job.0).or_default();
        applied.changed.push(task);
    }
    Ok(())
}

/// `queued`/`running` → `succeeded` for every `succeeded` event of a batch in one
/// statement, and the workers' `tasks_done` in another.
async fn apply_succeeded(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&Event],
    applied: &mut Applied,
    deltas: &mut Deltas,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let n = events.len();
    let (mut jobs, mut idx, mut attempts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut workers, mut keys, mut sha) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut sizes, mut load, mut render, mut upload) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for event in events {
        if let Event::Succeeded {
            task,
            attempt,
            worker,
            object_key,
            sha256,
            size_bytes,
            timings,
        } = event
        {
            jobs.push(task.job.0);
            idx.push(task.index as i32);
            attempts.push(attempt.0 as i32);
            workers.push(worker.0.as_str());
            keys.push(object_key.as_str());
            sha.push(sha256.as_str());
            sizes.push(*size_bytes as i64);
            load.push(timings.load_ms as i64);
            render.push(timings.render_ms as i64);
            upload.push(timings.upload_ms as i64);
        }
    }
    let rows = batch_query(
        "UPDATE tasks t SET status = 'succeeded', worker = u.w, object_key = u.k,
                sha256 = u.h, size_bytes = u.s, load_ms = u.l, render_ms = u.r,
                upload_ms = u.up, error = NULL, lease_deadline = NULL,
                started_at = coalesce(t.started_at, now()), finished_at = now(),
                updated_at = clock_timestamp()
         FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
              AS u(j, i, a, w, k, h, s, l, r, up)
         WHERE t.job_id = u.j AND t.idx = u.i AND t.attempt = u.a
           AND t.status IN ('queued', 'running')
         RETURNING t.job_id, t.idx, t.worker",
    )
    .bind(&jobs)
    .bind(&idx)
    .bind(&attempts)
    .bind(&workers)
    .bind(&keys)
    .bind(&sha)
    .bind(&sizes)
    .bind(&load)
    .bind(&render)
    .bind(&upload)
    .fetch_all(&mut **tx)
    .await?;
    applied.ignored += n - rows.len();
    let mut done: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows {
        let task = task_ref(&r)?;
        deltas.entry(task.job.0).or_default().0 += 1;
        applied.changed.push(task);
        *done.entry(r.try_get("worker")?).or_default() += 1;
    }
    if !done.is_empty() {
        let (ids, counts): (Vec<String>, Vec<i64>) = done.into_iter().unzip();
        sqlx::query(
            "UPDATE workers w SET tasks_done = w.tasks_done + u.n
             FROM unnest($1::text[], $2::bigint[]) AS u(id, n) WHERE w.id = u.id",
        )
        .bind(&ids)
        .bind(&counts)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn extend_leases(
    tx: &mut Transaction<'_, Postgres>,
    running: &[(TaskRef, Attempt)],
    lease: Duration,
) -> Result<()> {
    if running.is_empty() {
        return Ok(());
    }
    let jobs: Vec<Uuid> = running.iter().map(|(t, _)| t.job.0).collect();
    let idx: Vec<i32> = running.iter().map(|(t, _)| t.index as i32).collect();
    let attempts: Vec<i32> = running.iter().map(|(_, a)| a.0 as i32).collect();
    batch_query(
        "UPDATE tasks t SET lease_deadline = now() + make_interval(secs => $4)
         FROM unnest($1::uuid[], $2::int[], $3::int[]) AS u(j, i, a)
         WHERE t.job_id = u.j AND t.idx = u.i AND t.attempt = u.a
           AND t.status IN ('queued', 'running')",
    )
    .bind(&jobs)
    .bind(&idx)
    .bind(&attempts)
    .bind(secs(lease))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Adds finished-task counts to a job and settles its status: `running` once anything
/// happened, then `succeeded` or `failed` when every task is terminal. A cancelled job stays
/// cancelled.
async fn bump_job(
    tx: &mut Transaction<'_, Postgres>,
    job: Uuid,
    succeeded: i32,
    failed: i32,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET
            tasks_succeeded = tasks_succeeded + $2,
            tasks_failed = tasks_failed + $3,
            started_at = coalesce(started_at, now()),
            status = CASE
                WHEN status IN ('pending', 'running')
                     AND tasks_succeeded + $2 + tasks_failed + $3 + tasks_cancelled >= tasks_total
                    THEN CASE WHEN tasks_failed + $3 > 0 THEN 'failed' ELSE 'succeeded' END
                WHEN status = 'pending' THEN 'running'
                ELSE status END,
            finished_at = CASE
                WHEN status IN ('pending', 'running')
                     AND tasks_succeeded + $2 + tasks_failed + $3 + tasks_cancelled >= tasks_total
                    THEN now()
                ELSE finished_at END
         WHERE id = $1",
    )
    .bind(job)
    .bind(succeeded)
    .bind(failed)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const JOB_COLUMNS: &str =
    "SELECT id, tenant, spec, status, tasks_total, tasks_succeeded, tasks_failed,
        tasks_cancelled, created_at, finished_at FROM jobs";

fn job_from_row(r: &sqlx::postgres::PgRow) -> Result<JobRow> {
    let spec: serde_json::Value = r.try_get("spec")?;
    let spec = serde_json::from_value(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    job_with_spec(r, spec)
}

/// A job row's columns other than its spec, with `spec`.
fn job_with_spec(r: &sqlx::postgres::PgRow, spec: JobSpec) -> Result<JobRow> {
    let status: String = r.try_get("status")?;
    Ok(JobRow {
        id: JobId(r.try_get("id")?),
        tenant: r.try_get("tenant")?,
        spec,
        status: JobStatus::from_str(&status).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        tasks_total: r.try_get::<i32, _>("tasks_total")? as u32,
        tasks_succeeded: r.try_get::<i32, _>("tasks_succeeded")? as u32,
        tasks_failed: r.try_get::<i32, _>("tasks_failed")? as u32,
        tasks_cancelled: r.try_get::<i32, _>("tasks_cancelled")? as u32,
        created_at: r.try_get("created_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

/// The first pending task of each (tenant, priority) class, with `$1` a tenant or NULL for
/// all: one probe of `tasks_pending_tenant` per class, however many tasks wait.
const PENDING_HEADS: &str = "SELECT h.job_id, h.idx, h.created_at, h.priority
     FROM (SELECT DISTINCT tenant, priority FROM jobs
           WHERE status IN ('pending', 'running') AND ($1::text IS NULL OR tenant = $1)) cl
     CROSS JOIN LATERAL (
        SELECT k.job_id, k.idx, k.created_at, k.priority FROM tasks k
        WHERE k.tenant = cl.tenant AND k.priority = cl.priority AND k.status = 'pending'
        ORDER BY k.created_at, k.job_id, k.idx LIMIT 1
     ) h";

const TASK_COLUMNS: &str = "SELECT idx, seed, prompt, status, attempt, worker, object_key, sha256,
        size_bytes, error, started_at, finished_at, updated_at FROM tasks";

/// The task a row's `job_id` and `idx` name.
fn task_ref(r: &sqlx::postgres::PgRow) -> Result<TaskRef> {
    Ok(TaskRef {
        job: JobId(r.try_get("job_id")?),
        index: r.try_get::<i32, _>("idx")? as u32,
    })
}

fn task_from_row(r: &sqlx::postgres::PgRow) -> Result<TaskRow> {
    let status: String = r.try_get("status")?;
    Ok(TaskRow {
        index: r.try_get::<i32, _>("idx")? as u32,
        seed: seed_from_db(r.try_get("seed")?),
        prompt: r.try_get("prompt")?,
        status: TaskStatus::from_str(&status).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        attempt: r.try_get::<i32, _>("attempt")? as u32,
        worker: r.try_get("worker")?,
        object_key: r.try_get("object_key")?,
        sha256: r.try_get("sha256")?,
        size_bytes: r.try_get::<Option<i64>, _>("size_bytes")?.map(|n| n as u64),
        error: r.try_get("error")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

// Read models of the dashboard and /metrics, Retry failed, and webhook deliveries.

/// Unfinished tasks of one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelQueue {
    pub model: String,
    pub pending: u64,
    pub queued: u64,
    pub running: u64,
}

/// What the dashboard's overview shows, for one tenant or (admin) all of them.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    pub counts: TaskCounts,
    /// The pending task that has waited longest.
    pub oldest_waiting: Option<TaskRef>,
    pub models: Vec<ModelQueue>,
    /// (minute, succeeded, failed) over the last hour, oldest first; empty minutes are absent.
    pub per_minute: Vec<(DateTime<Utc>, u64, u64)>,
}

/// A webhook call claimed for one delivery attempt.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    pub id: Uuid,
    pub job: JobId,
    pub url: String,
    /// Including the attempt about to be made.
    pub attempts: u32,
}

/// A webhook delivery as the job page shows it.
#[derive(Debug, Clone)]
pub struct WebhookState {
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub response_status: Option<i32>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Task counts, queue per model, the oldest waiting task and the last hour's images per
    /// minute; `tenant` limits everything to that tenant's jobs.
    pub async fn overview(&self, tenant: Option<&str>) -> Result<Overview> {
        let rows = sqlx::query(
            "SELECT t.status, count(*) AS n FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE ($1::text IS NULL OR j.tenant = $1) GROUP BY t.status",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = TaskCounts::default();
        for r in &rows {
            let n = r.try_get::<i64, _>("n")?.max(0) as u64;
            match r.try_get::<String, _>("status")?.as_str() {
                "pending" => counts.pending = n,
                "queued" => counts.queued = n,
                "running" => counts.running = n,
                "succeeded" => counts.succeeded = n,
                "failed" => counts.failed = n,
                "cancelled" => counts.cancelled = n,
                _ => {}
            }
        }
        let oldest = sqlx::query(&format!(
            "{PENDING_HEADS} ORDER BY h.priority DESC, h.created_at, h.job_id, h.idx LIMIT 1"
        ))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let oldest_waiting = match oldest {
            Some(r) => {
                counts.oldest_pending = Some(r.try_get("created_at")?);
                Some(task_ref(&r)?)
            }
            None => None,
        };
        let rows = sqlx::query(
            "SELECT date_trunc('minute', t.finished_at) AS minute,
                    count(*) FILTER (WHERE t.status = 'succeeded') AS ok,
                    count(*) FILTER (WHERE t.status = 'failed') AS failed
             FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.finished_at IS NOT NULL AND t.finished_at > now() - interval '1 hour'
               AND ($1::text IS NULL OR j.tenant = $1)
             GROUP BY 1 ORDER BY 1",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let per_minute = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("minute")?,
                    r.try_get::<i64, _>("ok")?.max(0) as u64,
                    r.try_get::<i64, _>("failed")?.max(0) as u64,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Overview {
            counts,
            oldest_waiting,
            models: self.queue_by_model(tenant).await?,
            per_minute,
        })
    }

    /// Pending, queued and running tasks per model.
    pub async fn queue_by_model(&self, tenant: Option<&str>) -> Result<Vec<ModelQueue>> {
        let rows = sqlx::query(
            "SELECT j.spec->>'model' AS model,
                    count(*) FILTER (WHERE t.status = 'pending') AS pending,
                    count(*) FILTER (WHERE t.status = 'queued') AS queued,
                    count(*) FILTER (WHERE t.status = 'running') AS running
             FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.status IN ('pending', 'queued', 'running')
               AND ($1::text IS NULL OR j.tenant = $1)
             GROUP BY 1 ORDER BY 1",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ModelQueue {
                    model: r.try_get::<Option<String>, _>("model")?.unwrap_or_default(),
                    pending: r.try_get::<i64, _>("pending")?.max(0) as u64,
                    queued: r.try_get::<i64, _>("queued")?.max(0) as u64,
                    running: r.try_get::<i64, _>("running")?.max(0) as u64,
                })
            })
            .collect()
    }

    /// Sends a job's failed tasks back to `pending`, each with the job's `max_attempts` more
    /// attempts, and reopens the job. Returns the job and how many tasks were retried (0 for
    /// a cancelled job), or `None` for an unknown job.
    pub async fn retry_failed(&self, job: JobId) -> Result<Option<(JobRow, u64)>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT status, spec FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job.0)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get("status")?;
        let spec: serde_json::Value = row.try_get("spec")?;
        let spec: JobSpec =
            serde_json::from_value(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut retried = 0;
        if status != "cancelled" {
            retried = sqlx::query(
                "UPDATE tasks SET status = 'pending', finished_at = NULL, lease_deadline = NULL,
                        stream_id = NULL, max_attempts = attempt + $2,
                        updated_at = clock_timestamp()
                 WHERE job_id = $1 AND status = 'failed'",
            )
            .bind(job.0)
            .bind(spec.max_attempts.max(1) as i32)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if retried > 0 {
                sqlx::query(
                    "UPDATE jobs SET tasks_failed = greatest(tasks_failed - $2, 0),
                            status = 'running', finished_at = NULL
                     WHERE id = $1",
                )
                .bind(job.0)
                .bind(retried as i32)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(self.job(job).await?.map(|j| (j, retried)))
    }

    /// Records a delivery for every job that ended (in the last day) with a webhook and has
    /// none for that end yet. Returns how many were added.
    pub async fn enqueue_webhooks(&self) -> Result<u64> {
        Ok(sqlx::query(
            "INSERT INTO webhook_deliveries (id, job_id, job_finished_at, url)
             SELECT gen_random_uuid(), j.id, j.finished_at, j.spec->>'webhook_url' FROM jobs j
             WHERE j.finished_at IS NOT NULL AND j.spec ? 'webhook_url'
               AND j.finished_at > now() - interval '1 day'
               AND j.status IN ('succeeded', 'failed', 'cancelled')
               AND coalesce(j.spec->>'webhook_url', '') <> ''
             ON CONFLICT (job_id, job_finished_at) DO NOTHING",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Claims up to `limit` due deliveries for one attempt each; a claimed delivery is not
    /// due again for `lease` (so a coordinator that dies mid-call leaves it to another).
    pub async fn claim_webhooks(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<WebhookDelivery>> {
        let rows = sqlx::query(
            "WITH due AS (
                SELECT id FROM webhook_deliveries
                WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT $1
                FOR UPDATE SKIP LOCKED
             )
             UPDATE webhook_deliveries d
             SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
             FROM due WHERE d.id = due.id
             RETURNING d.id, d.job_id, d.url, d.attempts",
        )
        .bind(i64::from(limit))
        .bind(secs(lease))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WebhookDelivery {
                    id: r.try_get("id")?,
                    job: JobId(r.try_get("job_id")?),
                    url: r.try_get("url")?,
                    attempts: r.try_get::<i32, _>("attempts")?.max(0) as u32,
                })
            })
            .collect()
    }

    /// Records the outcome of a delivery attempt: delivered, to be retried after `retry_in`,
    /// or (no `retry_in`) given up.
    pub async fn finish_webhook(
        &self,
        id: Uuid,
        delivered: bool,
        response_status: Option<u16>,
        error: Option<&str>,
        retry_in: Option<Duration>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE webhook_deliveries SET
                status = CASE WHEN $2 THEN 'delivered' WHEN $5::float8 IS NULL THEN 'failed'
                              ELSE 'pending' END,
                delivered_at = CASE WHEN $2 THEN now() ELSE NULL END,
                response_status = $3, last_error = $4,
                next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at
                                       ELSE now() + make_interval(secs => $5) END
             WHERE id = $1",
        )
        .bind(id)
        .bind(delivered)
        .bind(response_status.map(i32::from))
        .bind(error)
        .bind(retry_in.map(secs))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The webhook deliveries of a job, newest first.
    pub async fn webhook_states(&self, job: JobId) -> Result<Vec<WebhookState>> {
        let rows = sqlx::query(
            "SELECT status, attempts, last_error, response_status, delivered_at
             FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at DESC",
        )
        .bind(job.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WebhookState {
                    status: r.try_get("status")?,
                    attempts: r.try_get::<i32, _>("attempts")?.max(0) as u32,
                    last_error: r.try_get("last_error")?,
                    response_status: r.try_get("response_status")?,
                    delivered_at: r.try_get("delivered_at")?,
                })
            })
            .collect()
    }
}
