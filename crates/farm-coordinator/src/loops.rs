//! The coordinator's three background loops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_core::{JobId, JobSpec, TaskRef, TaskSpec, WorkerId};
use farm_queue::Event;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::placement::{self, WorkerView};
use crate::store::Claimed;
use crate::{Shared, Update};

const DISPATCH_TICK: Duration = Duration::from_millis(100);
const REAP_TICK: Duration = Duration::from_secs(1);
const DISPATCH_GAP: Duration = Duration::from_millis(10);
const EVENT_BATCH: usize = 512;
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Tasks are placed only on workers whose last heartbeat (every 2 s) is younger than this
/// (or than the run lease, when shorter).
const PLACE_IF_HEARD_WITHIN: Duration = Duration::from_secs(6);
/// A claimed task whose stream id was not recorded this long after is requeued.
const UNSENT_AFTER: Duration = Duration::from_secs(15);

/// Late binding: tasks wait in Postgres, where priorities, fair share and cancellation act
/// on them, until a worker has room; then [`placement::place`] picks the worker (model
/// affinity, capabilities, bounded prefetch) and the task goes to that worker's stream.
pub(crate) async fn dispatcher(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut state = DispatchState::default();
    let mut submitted = false;
    loop {
        if !submitted {
            submitted = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.dispatch_now.notified() => false,
                _ = shared.submitted.notified() => true,
                _ = tokio::time::sleep(DISPATCH_TICK) => false,
            };
        }
        match dispatch_once(&shared, &mut state, submitted).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(n, "dispatched"),
            Err(e) => {
                tracing::warn!(error = %e, "dispatch failed; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        if state.specs.len() > 10_000 {
            state.specs.clear();
            state.published.clear();
        }
        // Wake-ups come with every applied event batch; coalesce them, so a busy farm pays
        // for one placement round per gap rather than per batch. A submission does not wait.
        submitted = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.submitted.notified() => true,
            _ = tokio::time::sleep(DISPATCH_GAP) => false,
        };
    }
    // Stream ids still being recorded are kept, not dropped half-way.
    if let Some(recording) = state.recording.take() {
        let _ = recording.await;
    }
    Ok(())
}

/// What the dispatcher keeps between rounds.
#[derive(Default)]
struct DispatchState {
    /// Job specs it has read, by job (jobs never change their spec).
    specs: HashMap<JobId, Arc<JobSpec>>,
    /// Whether a model is published in storage (any worker can download it).
    published: HashMap<String, bool>,
    /// When the last round placed tasks.
    last: Option<Instant>,
    /// The room the last round found on the workers (sizes an early read of candidates).
    last_room: Option<u32>,
    /// The previous round's stream ids, being written while this round places.
    recording: Option<tokio::task::JoinHandle<()>>,
}

impl DispatchState {
    /// Takes the specs of jobs just submitted here, and reads those of other jobs it has not
    /// seen yet.
    async fn learn_specs(
        &mut self,
        shared: &Shared,
        jobs: impl Iterator<Item = JobId>,
    ) -> anyhow::Result<()> {
        if let Ok(mut new) = shared.new_specs.lock() {
            self.specs.extend(new.drain(..));
        }
        let missing: Vec<JobId> = jobs
            .filter(|j| !self.specs.contains_key(j))
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            for (id, spec) in shared.store.job_specs(&missing).await? {
                self.specs.insert(id, Arc::new(spec));
            }
        }
        Ok(())
    }
}

/// The online workers that take new work, with what is placed on them.
async fn worker_views(
    shared: &Shared,
    state: &mut DispatchState,
) -> anyhow::Result<Vec<WorkerView>> {
    let fresh = PLACE_IF_HEARD_WITHIN.min(shared.config.run_lease);
    // Two small queries on two connections, at once.
    let (rows, placed_rows) = tokio::try_join!(shared.store.workers(), shared.store.placed())?;
    state
        .learn_specs(shared, placed_rows.iter().map(|p| p.job))
        .await?;
    let mut placed: HashMap<WorkerId, HashMap<String, u32>> = HashMap::new();
    for p in placed_rows {
        // A job without a spec cannot be (jobs are never deleted); count it under no model.
        let key = state
            .specs
            .get(&p.job)
            .map(|s| farm_core::model_key(&s.model, s.vae.as_deref()))
            .unwrap_or_default();
        *placed.entry(p.worker).or_default().entry(key).or_default() += p.tasks;
    }
    Ok(rows
        .into_iter()
        // Only workers heard from lately: one silent for a few heartbeats, or longer than a
        // run lease (its running task was just requeued), is likely dead.
        .filter(|w| w.online && !w.info.draining && w.silent_for < fresh)
        .map(|w| {
            let info = w.info;
            WorkerView {
                placed: placed.remove(&info.worker).unwrap_or_default(),
                id: info.worker,
                concurrency: info.concurrency,
                max_batch: info.max_batch,
                capabilities: info.capabilities,
                cache_capacity: info.cache.capacity,
                loaded: info.cache.models,
                available: info.available,
            }
        })
        .collect())
}

/// The most pending tasks one round reads.
const MAX_CANDIDATES: u32 = 4000;

/// How many pending tasks to read for `room` free places: more than the room, since tasks
/// waiting for a busy worker's model must not keep an idle worker idle.
fn candidate_limit(room: u32) -> u32 {
    (room + room / 4 + 16).min(MAX_CANDIDATES)
}

async fn dispatch_once(
    shared: &Shared,
    state: &mut DispatchState,
    submitted: bool,
) -> anyhow::Result<usize> {
    // After a submission the pending tasks are read while the workers are: new work on an
    // idle farm starts one round trip sooner. Otherwise (a busy farm, often without room)
    // the workers come first, and candidates only when there is room.
    let (workers, early) = if submitted {
        let limit = state.last_room.map_or(MAX_CANDIDATES, candidate_limit);
        let (workers, early) = tokio::try_join!(worker_views(shared, state), async {
            Ok(shared.store.candidates(limit, shared.config.ageing).await?)
        })?;
        (workers, Some(early))
    } else {
        (worker_views(shared, state).await?, None)
    };
    let room: u32 = workers
        .iter()
        .map(|w| w.prefetch().saturating_sub(w.placed.values().sum()))
        .sum();
    if room == 0 {
        return Ok(0);
    }
    // A trickle of room (a few tasks just ended) waits for the next tick, so each round
    // places a batch worth its queries.
    let prefetch: u32 = workers.iter().map(WorkerView::prefetch).sum();
    if room.saturating_mul(8) < prefetch && state.last.is_some_and(|t| t.elapsed() < DISPATCH_TICK)
    {
        return Ok(0);
    }
    state.last = Some(Instant::now());
    state.last_room = Some(room);
    let candidates = match early {
        Some(c) => c,
        None => {
            shared
                .store
                .candidates(candidate_limit(room), shared.config.ageing)
                .await?
        }
    };
    if candidates.is_empty() {
        return Ok(0);
    }
    state
        .learn_specs(shared, candidates.iter().map(|c| c.task.job))
        .await?;
    for c in &candidates {
        let Some(spec) = state.specs.get(&c.task.job) else {
            continue;
        };
        if !state.published.contains_key(&spec.model) {
            let key = format!(
                "{}/model_index.json",
                farm_core::published_model_dir(&shared.config.redis_prefix, &spec.model)
            );
            // Unknown (storage down): not downloadable, the safe side.
            let found = shared.storage.exists(&key).await.unwrap_or(false);
            state.published.insert(spec.model.clone(), found);
        }
    }
    let specs = &state.specs;
    let tasks: Vec<placement::Task> = candidates
        .iter()
        .filter_map(|c| {
            let spec = specs.get(&c.task.job)?;
            Some(placement::Task {
                task: c.task,
                mode: spec.mode,
                width: spec.width,
                height: spec.height,
                batch: spec.batch_key(),
                waited: c.waited,
                downloadable: state.published.get(&spec.model).copied().unwrap_or(false),
            })
        })
        .collect();
    let placed = placement::place(&workers, &tasks, shared.config.spread_after);
    if placed.is_empty() {
        return Ok(0);
    }
    let (refs, on): (Vec<TaskRef>, Vec<Option<WorkerId>>) =
        placed.into_iter().map(|(t, w)| (t, Some(w))).unzip();
    let claimed = shared
        .store
        .claim(&refs, &on, shared.config.queue_lease)
        .await?;
    if claimed.is_empty() {
        return Ok(0);
    }
    let prefix = &shared.config.redis_prefix;
    let messages: Vec<(WorkerId, TaskSpec)> = claimed
        .iter()
        .filter_map(|c| {
            let spec = specs.get(&c.task.job)?;
            let worker = c.worker.clone()?;
            Some((
                worker,
                spec.task_spec(c.task.job, c.task.index, c.attempt, prefix)?,
            ))
        })
        .collect();
    if messages.len() != claimed.len() {
        // Cannot happen while jobs are never deleted; put them back rather than lose them.
        shared.store.unclaim(&claimed).await?;
        anyhow::bail!("a claimed task has no job spec or worker");
    }
    let batch: Vec<(&WorkerId, &TaskSpec)> = messages.iter().map(|(w, t)| (w, t)).collect();
    let ids = match shared.queue.dispatch(&batch).await {
        Ok(ids) => ids,
        Err(e) => {
            unclaim_or_log(shared, &claimed).await;
            return Err(e.into());
        }
    };
    shared.metrics.dispatched(&claimed);
    for c in &claimed {
        let _ = shared.updates.send(Update::Changed(c.task));
    }
    // The workers have their tasks; the stream ids (needed only to retract a message later)
    // are written while the next round places. One write in flight at a time.
    if let Some(previous) = state.recording.take() {
        let _ = previous.await;
    }
    let store = shared.store.clone();
    let n = claimed.len();
    state.recording = Some(tokio::spawn(async move {
        if let Err(e) = store.set_stream_ids(&claimed, &ids).await {
            // The tasks stay `queued` without a stream id; the reaper requeues them after
            // UNSENT_AFTER, and their messages are fenced off by the new attempt.
            tracing::warn!(error = %e, "could not record stream ids");
        }
    }));
    Ok(n)
}

async fn unclaim_or_log(shared: &Shared, claimed: &[Claimed]) {
    if let Err(e) = shared.store.unclaim(claimed).await {
        // The leases will bring them back.
        tracing::warn!(error = %e, "could not unclaim tasks");
    }
}

/// Applies worker events to Postgres in batches; acknowledges only what was applied.
pub(crate) async fn ingester(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = shared.config.id.clone();
    // First the events this consumer was handed before a restart but never acknowledged.
    let mut pending = true;
    let mut drained = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = shared.queue.read_events(&consumer, EVENT_BATCH, Duration::from_secs(1), pending) => r,
        };
        let batch = match read {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading events failed; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        if !pending && batch.len() < EVENT_BATCH {
            // A short read of new events: the backlog that waited in the stream is applied
            // once this batch is.
            drained = true;
        }
        if batch.is_empty() {
            pending = false;
            if drained {
                shared
                    .caught_up
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            continue;
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for delivery in batch {
            match delivery.message {
                Ok(event) => {
                    ids.push(delivery.id);
                    events.push(event);
                }
                Err(bad) => {
                    tracing::warn!(id = %bad.id, reason = %bad.reason, "undecodable event dead-lettered");
                    shared.metrics.dead_letter_event();
                    if let Err(e) = shared.queue.dead_letter(None, &bad).await {
                        tracing::warn!(error = %e, "dead-lettering failed");
                    }
                }
            }
        }
        // Retry the same batch until Postgres takes it: nothing is acknowledged unapplied.
        let span = tracing::debug_span!("ingest", n = events.len());
        loop {
            match shared
                .store
                .apply(&events, shared.config.run_lease)
                .instrument(span.clone())
                .await
            {
                Ok(applied) => {
                    shared.metrics.observe_events(&events);
                    if applied.ignored > 0 {
                        tracing::debug!(
                            ignored = applied.ignored,
                            "stale or duplicate events ignored"
                        );
                    }
                    for task in applied.changed {
                        let _ = shared.updates.send(Update::Changed(task));
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "applying events failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
        }
        for event in &events {
            if let Event::Progress {
                task,
                step,
                total_steps,
                worker,
                loss,
                ..
            } = event
            {
                let _ = shared.updates.send(Update::Progress {
                    task: *task,
                    step: *step,
                    total_steps: *total_steps,
                    worker: worker.0.clone(),
                    loss: *loss,
                });
            }
        }
        if let Err(e) = shared.queue.ack_events(&ids).await {
            // Applying twice is harmless (fencing); the events come back after a restart.
            tracing::warn!(error = %e, "acknowledging events failed");
        }
        if drained {
            shared
                .caught_up
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        shared.dispatch_now.notify_one();
    }
}

/// Requeues tasks whose lease expired (worker killed, node lost, Redis emptied).
pub(crate) async fn reaper(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(REAP_TICK) => {}
        }
        if !shared.caught_up.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        match shared.queue.server_identity().await {
            Ok((run_id, uptime)) => match shared.store.note_redis_run_id(&run_id, uptime).await {
                Ok(Some(n)) => {
                    tracing::warn!(
                        requeued = n,
                        "Redis restarted and lost its streams; queued tasks requeued"
                    );
                    if let Err(e) = shared.queue.ensure_groups().await {
                        tracing::warn!(error = %e, "recreating consumer groups failed");
                    }
                    shared.dispatch_now.notify_one();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "recording the Redis run id failed"),
            },
            Err(e) => tracing::debug!(error = %e, "Redis unreachable"),
        }
        match shared.store.requeue_unsent(UNSENT_AFTER).await {
            Ok(tasks) if !tasks.is_empty() => {
                tracing::warn!(n = tasks.len(), "unconfirmed dispatches requeued");
                for task in tasks {
                    let _ = shared.updates.send(Update::Changed(task));
                }
                shared.dispatch_now.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "requeueing unconfirmed dispatches failed"),
        }
        if let Err(e) = requeue_from_dead_workers(&shared).await {
            tracing::warn!(error = %e, "checking for tasks held by dead workers failed");
        }
        match shared.store.reap_expired(1000).await {
            Ok(reaped) if reaped.is_empty() => {}
            Ok(reaped) => {
                tracing::warn!(
                    n = reaped.len(),
                    "leases expired; tasks requeued or dead-lettered"
                );
                shared.metrics.reaped(&reaped);
                let stale: Vec<(WorkerId, String)> = reaped
                    .iter()
                    .filter_map(|r| Some((r.worker.clone()?, r.stream_id.clone()?)))
                    .collect();
                if let Err(e) = shared.queue.retract_tasks(&stale).await {
                    tracing::warn!(error = %e, "could not retract stale dispatch messages");
                }
                for r in reaped {
                    let _ = shared.updates.send(Update::Changed(r.task));
                }
                shared.dispatch_now.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "reaping failed"),
        }
    }
}

/// Tasks placed on a worker that died, and not started, go back to the queue without waiting
/// for their lease; a dead worker's stream is deleted once nothing of it is left.
async fn requeue_from_dead_workers(shared: &Shared) -> anyhow::Result<()> {
    let departed = shared
        .store
        .requeue_from_departed(Duration::from_secs(crate::store::WORKER_ONLINE_SECS as u64))
        .await?;
    if !departed.is_empty() {
        tracing::warn!(
            n = departed.len(),
            "tasks placed on departed workers requeued"
        );
        let stale: Vec<(WorkerId, String)> = departed
            .iter()
            .filter_map(|d| Some((d.worker.clone(), d.stream_id.clone()?)))
            .collect();
        shared.queue.retract_tasks(&stale).await?;
        for d in departed {
            let _ = shared.updates.send(Update::Changed(d.task));
        }
        shared.dispatch_now.notify_one();
    }
    for worker in shared.store.departed_workers().await? {
        shared.queue.drop_worker_stream(&worker).await?;
    }
    Ok(())
}
