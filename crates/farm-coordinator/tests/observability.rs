//! The dashboard's and webhooks' store queries against a real Postgres: the overview, Retry
//! failed, and the webhook delivery queue. Each test uses its own database.

use std::time::Duration;

use farm_coordinator::store::Store;
use farm_core::{validate, Attempt, JobRequest, JobStatus, TaskRef, TaskStatus, WorkerId};
use farm_queue::{Event, Timings};

mod support;
use support::TestDb;

const LEASE: Duration = Duration::from_secs(30);

fn request(seeds: u32, webhook: &str) -> JobRequest {
    JobRequest {
        model: "tiny".into(),
        prompts: vec!["p".into()],
        seed_range: Some((1, seeds)),
        width: 64,
        height: 64,
        steps: 2,
        max_attempts: 1,
        webhook_url: webhook.into(),
        ..Default::default()
    }
}

fn w() -> WorkerId {
    WorkerId("w1".into())
}

/// Claims every pending task and applies `outcome(task, attempt)` for each.
async fn run_all(store: &Store, outcome: impl Fn(TaskRef, Attempt) -> Event) {
    let claimed = store.claim_for_dispatch(100, LEASE).await.expect("claim");
    let events: Vec<Event> = claimed.iter().map(|c| outcome(c.task, c.attempt)).collect();
    store.apply(&events, LEASE).await.expect("apply");
}

fn succeeded(task: TaskRef, attempt: Attempt) -> Event {
    Event::Succeeded {
        task,
        attempt,
        worker: w(),
        object_key: format!("k/{}", task.index),
        sha256: "ab".repeat(32),
        size_bytes: 10,
        timings: Timings::default(),
    }
}

fn failed(task: TaskRef, attempt: Attempt) -> Event {
    Event::Failed {
        task,
        attempt,
        worker: w(),
        error: "out of memory".into(),
        retryable: false,
    }
}

#[tokio::test]
async fn overview_counts_per_tenant_and_model() {
    let db = TestDb::new("farm_obs").await;
    let spec = validate(&request(3, "")).expect("valid");
    let (a, _) = db.store.submit(&spec, "acme").await.expect("submit");
    let (_b, _) = db.store.submit(&spec, "globex").await.expect("submit");

    let all = db.store.overview(None).await.expect("overview");
    assert_eq!(all.counts.pending, 6);
    assert_eq!(all.models.len(), 1);
    assert_eq!(
        (all.models[0].model.as_str(), all.models[0].pending),
        ("tiny", 6)
    );
    assert!(all.oldest_waiting.is_some());
    assert!(all.per_minute.is_empty());

    let acme = db.store.overview(Some("acme")).await.expect("overview");
    assert_eq!(acme.counts.pending, 3);
    assert_eq!(acme.oldest_waiting.map(|t| t.job), Some(a.id));

    run_all(&db.store, succeeded).await;
    let acme = db.store.overview(Some("acme")).await.expect("overview");
    assert_eq!(acme.counts.succeeded, 3);
    assert_eq!(acme.counts.pending, 0);
    assert!(acme.oldest_waiting.is_none());
    assert_eq!(acme.per_minute.iter().map(|m| m.1).sum::<u64>(), 3);
    assert!(db
        .store
        .queue_by_model(None)
        .await
        .expect("queue")
        .is_empty());
    db.drop_db().await;
}

#[tokio::test]
async fn retry_failed_reopens_the_job_with_fresh_attempts() {
    let db = TestDb::new("farm_obs").await;
    let spec = validate(&request(2, "")).expect("valid");
    let (job, _) = db.store.submit(&spec, "acme").await.expect("submit");
    run_all(&db.store, |t, a| {
        if t.index == 0 {
            succeeded(t, a)
        } else {
            failed(t, a)
        }
    })
    .await;
    let ended = db.store.job(job.id).await.expect("job").expect("exists");
    assert_eq!((ended.status, ended.tasks_failed), (JobStatus::Failed, 1));

    let (reopened, retried) = db
        .store
        .retry_failed(job.id)
        .await
        .expect("retry")
        .expect("exists");
    assert_eq!(retried, 1);
    assert_eq!(reopened.status, JobStatus::Running);
    assert_eq!((reopened.tasks_failed, reopened.finished_at), (0, None));
    let task = db
        .store
        .task(TaskRef {
            job: job.id,
            index: 1,
        })
        .await
        .expect("task")
        .expect("exists");
    assert_eq!(task.status, TaskStatus::Pending);

    // It gets another attempt (max_attempts was 1), and this time succeeds.
    run_all(&db.store, succeeded).await;
    let done = db.store.job(job.id).await.expect("job").expect("exists");
    assert_eq!(
        (done.status, done.tasks_succeeded),
        (JobStatus::Succeeded, 2)
    );
    let task = db
        .store
        .task(TaskRef {
            job: job.id,
            index: 1,
        })
        .await
        .expect("task")
        .expect("exists");
    assert_eq!((task.status, task.attempt), (TaskStatus::Succeeded, 2));

    // Nothing failed: nothing to retry. A cancelled job is not reopened.
    assert_eq!(
        db.store
            .retry_failed(job.id)
            .await
            .expect("retry")
            .map(|r| r.1),
        Some(0)
    );
    let (other, _) = db.store.submit(&spec, "acme").await.expect("submit");
    db.store.cancel(other.id).await.expect("cancel");
    let (still, retried) = db
        .store
        .retry_failed(other.id)
        .await
        .expect("retry")
        .expect("exists");
    assert_eq!((still.status, retried), (JobStatus::Cancelled, 0));
    assert!(db
        .store
        .retry_failed(farm_core::JobId::new())
        .await
        .expect("retry")
        .is_none());
    db.drop_db().await;
}

#[tokio::test]
async fn webhook_deliveries_queue_once_per_job_end_and_back_off() {
    let db = TestDb::new("farm_obs").await;
    let url = "https://example.com/hook";
    let (job, _) = db
        .store
        .submit(&validate(&request(1, url)).expect("valid"), "acme")
        .await
        .expect("submit");
    let (_plain, _) = db
        .store
        .submit(&validate(&request(1, "")).expect("valid"), "acme")
        .await
        .expect("submit");
    // Nothing ended yet.
    assert_eq!(db.store.enqueue_webhooks().await.expect("enqueue"), 0);
    run_all(&db.store, failed).await;
    // Only the job with a webhook, and only once.
    assert_eq!(db.store.enqueue_webhooks().await.expect("enqueue"), 1);
    assert_eq!(db.store.enqueue_webhooks().await.expect("enqueue"), 0);

    let claimed = db.store.claim_webhooks(10, LEASE).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].job, claimed[0].url.as_str(), claimed[0].attempts),
        (job.id, url, 1)
    );
    // Claimed: not due again while in flight.
    assert!(db
        .store
        .claim_webhooks(10, LEASE)
        .await
        .expect("claim")
        .is_empty());
    // Failed: due again after the backoff (zero here).
    db.store
        .finish_webhook(
            claimed[0].id,
            false,
            Some(500),
            Some("HTTP 500"),
            Some(Duration::ZERO),
        )
        .await
        .expect("finish");
    let again = db.store.claim_webhooks(10, LEASE).await.expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2);
    db.store
        .finish_webhook(again[0].id, true, Some(204), None, None)
        .await
        .expect("finish");
    assert!(db
        .store
        .claim_webhooks(10, LEASE)
        .await
        .expect("claim")
        .is_empty());
    let states = db.store.webhook_states(job.id).await.expect("states");
    assert_eq!(states.len(), 1);
    assert_eq!(
        (states[0].status.as_str(), states[0].attempts),
        ("delivered", 2)
    );
    assert_eq!(states[0].response_status, Some(204));

    // Retry failed and end again: a second delivery for the second end.
    db.store.retry_failed(job.id).await.expect("retry");
    run_all(&db.store, succeeded).await;
    assert_eq!(db.store.enqueue_webhooks().await.expect("enqueue"), 1);
    let third = db.store.claim_webhooks(10, LEASE).await.expect("claim");
    assert_eq!(third.len(), 1);
    // Given up: no retry.
    db.store
        .finish_webhook(third[0].id, false, None, Some("connection refused"), None)
        .await
        .expect("finish");
    assert!(db
        .store
        .claim_webhooks(10, LEASE)
        .await
        .expect("claim")
        .is_empty());
    let states = db.store.webhook_states(job.id).await.expect("states");
    assert_eq!(states.len(), 2);
    assert!(states.iter().any(|s| s.status == "failed"));
    db.drop_db().await;
}
