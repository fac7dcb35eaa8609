//! The store against a real Postgres: atomic idempotent submits, fencing by attempt, leases,
//! dead letters and cancellation. Each test uses its own database.

use std::time::Duration;

use farm_coordinator::store::{Store, DEFAULT_TENANT};
use farm_core::{validate, Attempt, JobRequest, JobStatus, TaskRef, TaskStatus, WorkerId};
use farm_queue::{Event, Timings, WorkerInfo};

mod support;
use support::TestDb;

fn request(seeds: u32, max_attempts: u32) -> JobRequest {
    JobRequest {
        model: "tiny".into(),
        prompts: vec!["p".into()],
        seed_range: Some((1, seeds)),
        width: 64,
        height: 64,
        steps: 2,
        max_attempts,
        ..Default::default()
    }
}

fn worker(n: u32) -> WorkerId {
    WorkerId(format!("w{n}"))
}

async fn heartbeat(store: &Store, slots: u32) {
    beat(store, worker(1), slots, false).await;
}

async fn beat(store: &Store, id: WorkerId, slots: u32, draining: bool) {
    let info = WorkerInfo {
        worker: id,
        hostname: "h".into(),
        device: "cpu".into(),
        concurrency: slots,
        models: vec![],
        available: vec!["tiny".into()],
        running: vec![],
        tasks_done: 0,
        tasks_failed: 0,
        max_batch: 1,
        capabilities: Default::default(),
        cache: Default::default(),
        draining,
        batches: 0,
    };
    store
        .apply(&[Event::Heartbeat(info)], Duration::from_secs(30))
        .await
        .expect("heartbeat");
}

fn succeeded(task: TaskRef, attempt: u32) -> Event {
    Event::Succeeded {
        task,
        attempt: Attempt(attempt),
        worker: worker(1),
        object_key: format!("k/{}", task.index),
        sha256: "ab".repeat(32),
        size_bytes: 10,
        timings: Timings::default(),
    }
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn submit_writes_every_task_once_and_honours_idempotency_keys() {
    let db = TestDb::new("farm_store").await;
    let mut req = request(5, 0);
    req.prompts = vec!["a".into(), "b".into()];
    req.idempotency_key = "key-1".into();
    let spec = validate(&req).expect("valid");
    let (job, created) = db
        .store
        .submit(&spec, DEFAULT_TENANT)
        .await
        .expect("submit");
    assert!(created);
    assert_eq!(job.tasks_total, 10);
    let tasks = db.store.tasks(job.id).await.expect("tasks");
    assert_eq!(tasks.len(), 10);
    assert_eq!((tasks[6].prompt.as_str(), tasks[6].seed), ("b", 2));
    assert!(tasks
        .iter()
        .all(|t| t.status == TaskStatus::Pending && t.attempt == 0));

    let (again, created) = db
        .store
        .submit(&spec, DEFAULT_TENANT)
        .await
        .expect("resubmit");
    assert!(!created);
    assert_eq!(again.id, job.id);
    assert_eq!(
        db.store
            .list_jobs(None, None, 10, None)
            .await
            .expect("list")
            .len(),
        1
    );

    // Seeds beyond i64 survive the bigint column.
    let mut big = request(2, 0);
    big.seed_range = Some((u64::MAX - 1, 2));
    let (job, _) = db
        .store
        .submit(&validate(&big).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    let seeds: Vec<u64> = db
        .store
        .tasks(job.id)
        .await
        .expect("tasks")
        .iter()
        .map(|t| t.seed)
        .collect();
    assert_eq!(seeds, vec![u64::MAX - 1, u64::MAX]);
    db.drop_db().await;
}

#[tokio::test]
async fn late_and_duplicate_events_change_nothing() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (job, _) = store
        .submit(&validate(&request(1, 3)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    heartbeat(store, 1).await;
    let task = TaskRef {
        job: job.id,
        index: 0,
    };

    // Attempt 1 is dispatched with an already-expired lease, started, then reaped.
    let claimed = store
        .claim_for_dispatch(10, Duration::ZERO)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempt, Attempt(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store.reap_expired(100).await.expect("reap");
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].status, TaskStatus::Pending);

    let claimed = store.claim_for_dispatch(10, LEASE).await.expect("claim");
    assert_eq!(claimed[0].attempt, Attempt(2));

    // Attempt 1 reports late: ignored.
    let applied = store
        .apply(&[succeeded(task, 1)], LEASE)
        .await
        .expect("apply");
    assert_eq!(applied.ignored, 1);
    let row = store.task(task).await.expect("task").expect("exists");
    assert_eq!(row.status, TaskStatus::Queued);
    assert!(row
        .error
        .as_deref()
        .is_some_and(|e| e.contains("lease expired")));

    // Attempt 2 succeeds; a duplicate of that event changes nothing.
    let started = Event::Started {
        task,
        attempt: Attempt(2),
        worker: worker(1),
    };
    store
        .apply(&[started, succeeded(task, 2)], LEASE)
        .await
        .expect("apply");
    let applied = store
        .apply(&[succeeded(task, 2)], LEASE)
        .await
        .expect("apply");
    assert_eq!(applied.ignored, 1);
    let job = store.job(job.id).await.expect("job").expect("exists");
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!((job.tasks_succeeded, job.tasks_failed), (1, 0));
    let row = store.task(task).await.expect("task").expect("exists");
    assert_eq!((row.status, row.attempt), (TaskStatus::Succeeded, 2));
    assert_eq!(row.object_key.as_deref(), Some("k/0"));
    db.drop_db().await;
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_with_the_last_error() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (job, _) = store
        .submit(&validate(&request(2, 2)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    heartbeat(store, 2).await;
    let (t0, t1) = (
        TaskRef {
            job: job.id,
            index: 0,
        },
        TaskRef {
            job: job.id,
            index: 1,
        },
    );

    // Task 0: a retryable failure, then a lease expiry on the last attempt.
    // Task 1: a non-retryable failure fails at once.
    store.claim_for_dispatch(10, LEASE).await.expect("claim");
    let fail = |task, retryable| Event::Failed {
        task,
        attempt: Attempt(1),
        worker: worker(1),
        error: "boom".into(),
        retryable,
    };
    store
        .apply(&[fail(t0, true), fail(t1, false)], LEASE)
        .await
        .expect("apply");
    let row = store.task(t1).await.expect("task").expect("exists");
    assert_eq!(row.status, TaskStatus::Failed);
    assert!(row.error.as_deref().is_some_and(|e| e.contains("boom")));
    assert_eq!(
        store.task(t0).await.expect("task").expect("exists").status,
        TaskStatus::Pending
    );

    let claimed = store
        .claim_for_dispatch(10, Duration::ZERO)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store.reap_expired(100).await.expect("reap");
    assert_eq!(reaped[0].status, TaskStatus::Failed);
    let row = store.task(t0).await.expect("task").expect("exists");
    assert_eq!((row.status, row.attempt), (TaskStatus::Failed, 2));
    assert!(row
        .error
        .as_deref()
        .is_some_and(|e| e.contains("attempt 2: lease expired")));
    let job = store.job(job.id).await.expect("job").expect("exists");
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.tasks_failed, 2);
    // Nothing is left to dispatch.
    assert!(store
        .claim_for_dispatch(10, LEASE)
        .await
        .expect("claim")
        .is_empty());
    db.drop_db().await;
}

#[tokio::test]
async fn cancel_stops_unfinished_tasks_and_keeps_finished_ones() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (job, _) = store
        .submit(&validate(&request(3, 0)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    heartbeat(store, 1).await;
    let claimed = store.claim_for_dispatch(1, LEASE).await.expect("claim");
    store
        .apply(&[succeeded(claimed[0].task, 1)], LEASE)
        .await
        .expect("apply");
    let job = store.cancel(job.id).await.expect("cancel").expect("exists");
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!((job.tasks_succeeded, job.tasks_cancelled), (1, 2));
    assert!(store
        .claim_for_dispatch(10, LEASE)
        .await
        .expect("claim")
        .is_empty());
    assert!(store
        .cancel(farm_core::JobId::new())
        .await
        .expect("cancel")
        .is_none());
    db.drop_db().await;
}

#[tokio::test]
async fn tokens_tenants_and_quotas() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let token = store.create_token("alice", false).await.expect("token");
    let admin = store.create_token("ops", true).await.expect("token");
    assert_eq!(
        store.token_owner(&token).await.expect("owner"),
        Some(("alice".into(), false))
    );
    assert_eq!(
        store.token_owner(&admin).await.expect("owner"),
        Some(("ops".into(), true))
    );
    assert_eq!(store.token_owner("farm_guess").await.expect("owner"), None);

    let spec = validate(&request(5, 0)).expect("valid");
    let (job, _) = store.submit(&spec, "alice").await.expect("submit");
    assert!(store
        .visible_job(job.id, Some("bob"))
        .await
        .expect("job")
        .is_none());
    assert!(store
        .visible_job(job.id, Some("alice"))
        .await
        .expect("job")
        .is_some());
    assert!(store
        .visible_job(job.id, None)
        .await
        .expect("job")
        .is_some());
    assert!(store
        .list_jobs(Some("bob"), None, 10, None)
        .await
        .expect("list")
        .is_empty());
    assert_eq!(
        store
            .list_jobs(Some("alice"), None, 10, None)
            .await
            .expect("list")
            .len(),
        1
    );

    // Quota: 5 unfinished + 5 more > 8 is refused and writes nothing; a retried submit of a
    // job that already exists is not counted twice.
    let mut keyed = request(5, 0);
    keyed.idempotency_key = "k".into();
    let keyed = validate(&keyed).expect("valid");
    store
        .submit_with_quota(&keyed, "carol", Some(8))
        .await
        .expect("within quota");
    let err = store
        .submit_with_quota(&spec, "carol", Some(8))
        .await
        .expect_err("over quota");
    assert!(
        matches!(
            err,
            farm_coordinator::StoreError::Quota {
                unfinished: 5,
                requested: 5,
                limit: 8,
                ..
            }
        ),
        "{err}"
    );
    let (again, created) = store
        .submit_with_quota(&keyed, "carol", Some(8))
        .await
        .expect("retry");
    assert!(!created);
    assert_eq!(
        store
            .list_jobs(Some("carol"), None, 10, None)
            .await
            .expect("list")
            .len(),
        1
    );
    assert_eq!(again.tenant, "carol");
    db.drop_db().await;
}

#[tokio::test]
async fn a_new_redis_run_id_requeues_what_the_old_redis_held() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (job, _) = store
        .submit(&validate(&request(3, 0)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    assert_eq!(
        store.note_redis_run_id("run-a", 100).await.expect("note"),
        None
    );
    let claimed = store.claim_for_dispatch(2, LEASE).await.expect("claim");
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        store.note_redis_run_id("run-a", 101).await.expect("note"),
        None
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Redis restarted: both queued tasks were in the lost stream.
    assert_eq!(
        store.note_redis_run_id("run-b", 0).await.expect("note"),
        Some(2)
    );
    assert_eq!(
        store.note_redis_run_id("run-b", 1).await.expect("note"),
        None
    );
    let tasks = store.tasks(job.id).await.expect("tasks");
    assert!(tasks.iter().all(|t| t.status == TaskStatus::Pending));
    // The next dispatch is a new attempt, so anything from the old one is fenced off.
    let again = store.claim_for_dispatch(3, LEASE).await.expect("claim");
    assert_eq!(again.iter().filter(|c| c.attempt == Attempt(2)).count(), 2);
    db.drop_db().await;
}

#[tokio::test]
async fn a_small_tenant_is_not_starved_behind_a_bulk_job() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let bulk = validate(&request(1000, 0)).expect("valid");
    let (a, _) = store.submit(&bulk, "tenant-a").await.expect("submit a");
    let small = validate(&request(10, 0)).expect("valid");
    let (b, _) = store.submit(&small, "tenant-b").await.expect("submit b");
    // The next dispatches alternate between the tenants.
    let first = store.claim_for_dispatch(4, LEASE).await.expect("claim");
    let from_b = first.iter().filter(|c| c.task.job == b.id).count();
    let from_a = first.iter().filter(|c| c.task.job == a.id).count();
    assert_eq!((from_a, from_b), (2, 2), "{first:?}");
    // Within a tenant, its own order holds: B's tasks come in index order.
    let b_tasks: Vec<u32> = first
        .iter()
        .filter(|c| c.task.job == b.id)
        .map(|c| c.task.index)
        .collect();
    assert_eq!(b_tasks, vec![0, 1]);
    // Higher priority still goes first, whatever the tenant.
    let mut urgent = request(2, 0);
    urgent.priority = 10;
    let (u, _) = store
        .submit(&validate(&urgent).expect("valid"), "tenant-a")
        .await
        .expect("submit");
    let next = store.claim_for_dispatch(2, LEASE).await.expect("claim");
    assert!(next.iter().all(|c| c.task.job == u.id), "{next:?}");
    db.drop_db().await;
}

#[tokio::test]
async fn claims_whose_dispatch_was_never_confirmed_are_requeued() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (job, _) = store
        .submit(&validate(&request(2, 0)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    let claimed = store.claim_for_dispatch(2, LEASE).await.expect("claim");
    // Only the first one's message is known to have gone out.
    store
        .set_stream_ids(&claimed[..1], &["1-0".to_string()])
        .await
        .expect("stream id");
    assert!(store
        .requeue_unsent(Duration::from_secs(60))
        .await
        .expect("requeue")
        .is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let requeued = store.requeue_unsent(Duration::ZERO).await.expect("requeue");
    assert_eq!(requeued, vec![claimed[1].task]);
    let tasks = store.tasks(job.id).await.expect("tasks");
    assert_eq!(
        tasks[claimed[0].task.index as usize].status,
        TaskStatus::Queued
    );
    assert_eq!(
        tasks[claimed[1].task.index as usize].status,
        TaskStatus::Pending
    );
    db.drop_db().await;
}

#[tokio::test]
async fn weights_share_turns_and_ageing_lifts_waiting_low_priorities() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    let (a, _) = store
        .submit(&validate(&request(100, 0)).expect("valid"), "tenant-a")
        .await
        .expect("submit a");
    let (b, _) = store
        .submit(&validate(&request(100, 0)).expect("valid"), "tenant-b")
        .await
        .expect("submit b");
    store
        .set_tenant_weight("tenant-a", 3.0)
        .await
        .expect("weight");
    // Weight 3 against 1: three of A's tasks for each of B's.
    let next = store
        .candidates(8, Duration::from_secs(60))
        .await
        .expect("candidates");
    let from_a = next.iter().filter(|c| c.task.job == a.id).count();
    let from_b = next.iter().filter(|c| c.task.job == b.id).count();
    assert_eq!((from_a, from_b), (6, 2), "{next:?}");

    // A low-priority job waits behind urgent work...
    let mut low = request(1, 0);
    low.priority = -10;
    let (low, _) = store
        .submit(&validate(&low).expect("valid"), "tenant-c")
        .await
        .expect("submit low");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut urgent = request(1, 0);
    urgent.priority = 10;
    let (urgent, _) = store
        .submit(&validate(&urgent).expect("valid"), "tenant-d")
        .await
        .expect("submit urgent");
    let fresh = store
        .candidates(1, Duration::from_secs(60))
        .await
        .expect("candidates");
    assert_eq!(fresh[0].task.job, urgent.id);
    // ...until it has waited long enough (here: ageing of 1 ms per priority step): then it
    // ranks with the highest class, and being older, goes before the urgent task.
    let aged = store
        .candidates(300, Duration::from_millis(1))
        .await
        .expect("candidates");
    let at = |job| aged.iter().position(|c| c.task.job == job).expect("listed");
    assert!(at(low.id) < at(urgent.id), "{aged:?}");
    assert!(aged[at(low.id)].waited >= Duration::from_millis(50));
    db.drop_db().await;
}

#[tokio::test]
async fn placed_tasks_are_counted_per_worker_and_taken_back_when_it_drains() {
    let db = TestDb::new("farm_store").await;
    let store = &db.store;
    beat(store, worker(1), 1, false).await;
    beat(store, worker(2), 1, false).await;
    let (job, _) = store
        .submit(&validate(&request(3, 0)).expect("valid"), DEFAULT_TENANT)
        .await
        .expect("submit");
    let tasks: Vec<TaskRef> = (0..3).map(|index| TaskRef { job: job.id, index }).collect();
    let on = [Some(worker(1)), Some(worker(1)), Some(worker(2))];
    let claimed = store.claim(&tasks, &on, LEASE).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    // Claiming again finds nothing pending: no task is placed twice.
    assert!(store
        .claim(&tasks, &on, LEASE)
        .await
        .expect("claim")
        .is_empty());
    let mut placed = store.placed().await.expect("placed");
    placed.sort_by(|x, y| x.worker.0.cmp(&y.worker.0));
    assert_eq!(
        placed
            .iter()
            .map(|p| (p.worker.0.as_str(), p.job, p.tasks))
            .collect::<Vec<_>>(),
        vec![("w1", job.id, 2), ("w2", job.id, 1)]
    );
    let gone_after = Duration::from_millis(300);
    assert!(store
        .requeue_from_departed(gone_after)
        .await
        .expect("requeue")
        .is_empty());
    // Worker 2 drains and gives task 2 back: pending again, its attempt not spent. Only the
    // worker holding a task can release it.
    beat(store, worker(2), 1, true).await;
    let release = |w: u32, task: TaskRef| Event::Released {
        task,
        attempt: Attempt(1),
        worker: worker(w),
    };
    let applied = store
        .apply(&[release(1, tasks[2]), release(2, tasks[2])], LEASE)
        .await
        .expect("release");
    assert_eq!((applied.changed.len(), applied.ignored), (1, 1));
    let rows = store.tasks(job.id).await.expect("tasks");
    assert_eq!((rows[2].status, rows[2].attempt), (TaskStatus::Pending, 0));
    assert_eq!(rows[2].worker, None);
    let workers = store.workers().await.expect("workers");
    assert!(workers
        .iter()
        .any(|w| w.info.worker == worker(2) && w.info.draining));
    // Worker 1 stops sending heartbeats, worker 2 goes on: worker 1's tasks come back.
    tokio::time::sleep(gone_after + Duration::from_millis(100)).await;
    beat(store, worker(2), 1, false).await;
    let back = store
        .requeue_from_departed(gone_after)
        .await
        .expect("requeue");
    let mut back: Vec<(u32, String)> = back
        .iter()
        .map(|d| (d.task.index, d.worker.0.clone()))
        .collect();
    back.sort();
    assert_eq!(back, vec![(0, "w1".to_string()), (1, "w1".to_string())]);
    let rows = store.tasks(job.id).await.expect("tasks");
    assert!(rows.iter().all(|r| r.status == TaskStatus::Pending));
    db.drop_db().await;
}
