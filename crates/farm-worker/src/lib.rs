//! A worker: reads tasks from the dispatch stream, renders them with farm-diffusion, uploads
//! the PNG and reports events. It needs only Redis and the object store: no database
//! credentials live on GPU nodes.

mod finetune;
mod models;
pub mod png;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use farm_core::{Attempt, TaskRef, TaskSpec, WorkerId};
use farm_diffusion::{BatchItem, DiffusionError, Request, RgbImage};
use farm_queue::{Delivery, Event, Queue, Timings, WorkerInfo};
use farm_storage::Storage;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use models::{ModelCache, ModelError};

const HEARTBEAT: Duration = Duration::from_secs(2);
const CANCEL_POLL: Duration = Duration::from_millis(200);
/// At most this many progress events per second per task.
const PROGRESS_PER_SEC: u32 = 4;
const UPLOAD_TRIES: u32 = 5;
/// A draining worker waits at least this long after announcing it before giving back its
/// unstarted tasks, so the coordinator has stopped placing new ones.
const DRAIN_SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub redis_url: String,
    pub redis_prefix: String,
    /// PEM CA certificate for a `rediss://` Redis with a private CA.
    pub redis_ca: Option<PathBuf>,
    pub storage: String,
    pub models_root: PathBuf,
    pub concurrency: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub id: WorkerId,
    /// What renders the tasks: the real Stable Diffusion engine, or the benchmark-only
    /// `null` pipeline.
    pub pipeline: Pipeline,
    /// Up to this many compatible tasks (same batch key) render as one batch.
    pub max_batch: usize,
    /// Bytes of models kept loaded (LRU); `None`: no limit.
    pub model_cache_bytes: Option<u64>,
    /// What it admits (max pixels, device memory, modes); the coordinator routes by it.
    pub capabilities: farm_core::Capabilities,
}

/// `sd`: Stable Diffusion on candle. `null`: benchmark-only, no model; every task gets the
/// same tiny PNG, still uploaded to storage and reported with real events, so a benchmark
/// measures the farm's own cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pipeline {
    #[default]
    Sd,
    Null,
}

impl std::str::FromStr for Pipeline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sd" => Ok(Pipeline::Sd),
            "null" => Ok(Pipeline::Null),
            other => Err(format!("unknown pipeline {other:?}; use sd or null")),
        }
    }
}

impl WorkerConfig {
    pub fn new(redis_url: &str, storage: &str, models_root: PathBuf) -> Self {
        WorkerConfig {
            redis_url: redis_url.to_string(),
            redis_prefix: "farm".into(),
            redis_ca: None,
            storage: storage.to_string(),
            models_root,
            concurrency: 1,
            device: "cpu".into(),
            id: default_worker_id(),
            pipeline: Pipeline::Sd,
            max_batch: 1,
            model_cache_bytes: None,
            capabilities: farm_core::Capabilities::default(),
        }
    }
}

/// `hostname-pid-xxxx`: unique per process, readable in the dashboard.
pub fn default_worker_id() -> WorkerId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
    WorkerId(format!("{host}-{}-{suffix}", std::process::id()))
}

struct Worker {
    config: WorkerConfig,
    queue: Queue,
    storage: Storage,
    models: ModelCache,
    running: Mutex<HashMap<TaskRef, Attempt>>,
    done: AtomicU64,
    failed: AtomicU64,
    draining: AtomicBool,
    batches: AtomicU64,
    /// Wakes the heartbeat loop early (e.g. to announce draining at once).
    beat_now: tokio::sync::Notify,
}

/// Runs a worker until `shutdown` is cancelled, then lets the tasks in hand finish.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(config.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        (1..=farm_diffusion::pipeline::MAX_BATCH).contains(&config.max_batch),
        "--max-batch must be between 1 and {}",
        farm_diffusion::pipeline::MAX_BATCH
    );
    let device = farm_diffusion::parse_device(&config.device)
        .with_context(|| format!("--device {}", config.device))?;
    let ca_pem = config
        .redis_ca
        .as_ref()
        .map(|p| {
            std::fs::read(p)
                .with_context(|| format!("FARM_REDIS_CA {}: cannot read it", p.display()))
        })
        .transpose()?;
    let queue = Queue::connect_with_ca(&config.redis_url, &config.redis_prefix, ca_pem)
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {}; start it (e.g. `redis-server --daemonize yes --port 6379`) or set FARM_REDIS_URL",
                farm_core::redact_url(&config.redis_url)
            )
        })?;
    let storage =
        Storage::open(&config.storage).context("cannot open storage; set FARM_STORAGE")?;
    storage
        .check()
        .await
        .with_context(|| format!("cannot reach storage {}", config.storage))?;
    queue
        .ensure_worker_stream(&config.id)
        .await
        .context("cannot create this worker's dispatch stream")?;
    let worker = Arc::new(Worker {
        models: ModelCache::new(config.models_root.clone(), device)
            .with_published(storage.clone(), &config.redis_prefix)
            .with_capacity(config.model_cache_bytes),
        config,
        queue,
        storage,
        running: Mutex::new(HashMap::new()),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        batches: AtomicU64::new(0),
        beat_now: tokio::sync::Notify::new(),
    });
    tracing::info!(
        worker = %worker.config.id,
        concurrency = worker.config.concurrency,
        max_batch = worker.config.max_batch,
        device = %worker.config.device,
        "worker started"
    );

    let beats_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeats(worker.clone(), beats_stop.clone()));
    let slots = Arc::new(Semaphore::new(worker.config.concurrency));
    let mut in_flight = tokio::task::JoinSet::new();
    // A restart under the same id (a pod's name) first takes what it held before: one read
    // of its pending list (a later one would return the tasks this process holds too).
    let mut pending = true;
    'read: loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.context("slot semaphore closed")?,
        };
        let (me, count) = (&worker.config.id, worker.config.max_batch);
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = async {
                if pending {
                    worker.queue.pending_tasks(me, 10_000).await
                } else {
                    worker.queue.read_tasks(me, count, Duration::from_secs(2)).await
                }
            } => r,
        };
        let deliveries = match read {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading tasks failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        pending = false;
        let mut permit = Some(permit);
        for batch in batches(&worker, deliveries).await {
            let permit = match permit.take() {
                Some(p) => p,
                // More than one batch key in one read: each further batch waits for a slot.
                None => slots
                    .clone()
                    .acquire_owned()
                    .await
                    .context("slot semaphore closed")?,
            };
            let worker = worker.clone();
            in_flight.spawn(async move {
                handle(&worker, batch).await;
                drop(permit);
            });
            if shutdown.is_cancelled() {
                break 'read;
            }
        }
        while in_flight.try_join_next().is_some() {}
    }
    // Draining: say so at once, so the coordinator stops placing tasks here; finish the
    // tasks in hand, then give back those placed here but not started.
    worker.draining.store(true, Ordering::Relaxed);
    worker.beat_now.notify_one();
    let announced = Instant::now();
    tracing::info!(
        in_flight = in_flight.len(),
        "worker draining; finishing tasks in hand"
    );
    while in_flight.join_next().await.is_some() {}
    // Whatever the coordinator placed before it heard: give it back.
    if let Some(rest) = DRAIN_SETTLE.checked_sub(announced.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    release_unstarted(&worker).await;
    // A last heartbeat (still draining, nothing running) before going.
    worker.beat_now.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    beats_stop.cancel();
    let _ = heartbeat.await;
    Ok(())
}

/// Gives back every task still waiting in this worker's stream, so it runs elsewhere at once.
async fn release_unstarted(worker: &Worker) {
    loop {
        let got = match worker
            .queue
            .read_tasks(&worker.config.id, 100, Duration::ZERO)
            .await
        {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tasks to give back; their leases will");
                return;
            }
        };
        if got.is_empty() {
            return;
        }
        for delivery in got {
            match delivery.message {
                Ok(spec) => {
                    let event = Event::Released {
                        task: spec.task,
                        attempt: spec.attempt,
                        worker: worker.config.id.clone(),
                    };
                    if !publish(worker, std::slice::from_ref(&event)).await {
                        // The coordinator requeues it once this worker's heartbeats stop.
                        return;
                    }
                    tracing::info!(job = %spec.task.job, index = spec.task.index, "unstarted task given back");
                    ack(worker, &[delivery.id]).await;
                }
                Err(bad) => {
                    if let Err(e) = worker
                        .queue
                        .dead_letter(Some(&worker.config.id), &bad)
                        .await
                    {
                        tracing::warn!(error = %e, "dead-lettering failed");
                    }
                }
            }
        }
    }
}

/// Splits what one read returned into batches: undecodable messages are dead-lettered, and
/// tasks with equal batch keys (in order of arrival) share a batch; fine-tuning runs alone.
async fn batches(worker: &Worker, deliveries: Vec<Delivery<TaskSpec>>) -> Vec<Vec<Held>> {
    let mut out: Vec<(Option<farm_core::BatchKey>, Vec<Held>)> = Vec::new();
    for delivery in deliveries {
        let spec = match delivery.message {
            Ok(spec) => spec,
            Err(bad) => {
                tracing::warn!(id = %bad.id, reason = %bad.reason, "malformed task dead-lettered");
                if let Err(e) = worker
                    .queue
                    .dead_letter(Some(&worker.config.id), &bad)
                    .await
                {
                    tracing::warn!(error = %e, "dead-lettering failed");
                }
                continue;
            }
        };
        let key = spec.batch_key();
        let held = Held {
            id: delivery.id,
            spec,
        };
        let max = worker.config.max_batch.max(1);
        match out
            .iter_mut()
            .find(|(k, b)| key.is_some() && *k == key && b.len() < max)
        {
            Some((_, batch)) => batch.push(held),
            None => out.push((key, vec![held])),
        }
    }
    out.into_iter().map(|(_, b)| b).collect()
}

/// A task read from this worker's stream: its message id and spec.
struct Held {
    id: String,
    spec: TaskSpec,
}

async fn heartbeats(worker: Arc<Worker>, stop: CancellationToken) {
    loop {
        let cache = worker.models.state();
        let info = WorkerInfo {
            worker: worker.config.id.clone(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            device: worker.config.device.clone(),
            concurrency: worker.config.concurrency as u32,
            models: cache.models.iter().map(|(k, _)| k.clone()).collect(),
            available: worker.models.available(),
            running: worker
                .running
                .lock()
                .map(|r| r.iter().map(|(t, a)| (*t, *a)).collect())
                .unwrap_or_default(),
            tasks_done: worker.done.load(Ordering::Relaxed),
            tasks_failed: worker.failed.load(Ordering::Relaxed),
            max_batch: worker.config.max_batch as u32,
            capabilities: worker.config.capabilities.clone(),
            cache,
            draining: worker.draining.load(Ordering::Relaxed),
            batches: worker.batches.load(Ordering::Relaxed),
        };
        if let Err(e) = worker.queue.publish(&Event::Heartbeat(info)).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = worker.beat_now.notified() => {}
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Why a task did not succeed.
#[derive(Debug, thiserror::Error)]
enum TaskError {
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("render: {0}")]
    Render(DiffusionError),
    #[error("encode: {0}")]
    Encode(String),
    #[error("upload: {0}")]
    Upload(#[from] farm_storage::StorageError),
    #[error("render thread: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("input image {key}: {message}")]
    Input { key: String, message: String },
    #[error("training: {0}")]
    Train(DiffusionError),
    #[error("{0}")]
    Io(String),
}

impl TaskError {
    fn retryable(&self) -> bool {
        match self {
            TaskError::Model(e) => e.retryable(),
            TaskError::Render(DiffusionError::InvalidInput(_)) => false,
            TaskError::Train(DiffusionError::InvalidInput(_) | DiffusionError::Model { .. }) => {
                false
            }
            _ => true,
        }
    }
}

/// What became of one task; cloneable, so one failure of a batch's shared work (loading
/// its model, say) is every task's.
#[derive(Debug, Clone)]
enum Outcome {
    Done {
        object_key: String,
        sha256: String,
        size_bytes: u64,
        timings: Timings,
    },
    Cancelled,
    Failed {
        error: String,
        retryable: bool,
    },
}

impl From<Result<(String, String, u64, Timings), TaskError>> for Outcome {
    fn from(r: Result<(String, String, u64, Timings), TaskError>) -> Self {
        match r {
            Ok((object_key, sha256, size_bytes, timings)) => Outcome::Done {
                object_key,
                sha256,
                size_bytes,
                timings,
            },
            Err(TaskError::Cancelled) => Outcome::Cancelled,
            Err(e) => Outcome::Failed {
                retryable: e.retryable(),
                error: e.to_string(),
            },
        }
    }
}

/// Runs one batch (often of one task): drops tasks of cancelled jobs, reports each task
/// started, renders them together, then reports and acknowledges each.
async fn handle(worker: &Arc<Worker>, batch: Vec<Held>) {
    let mut live = Vec::with_capacity(batch.len());
    let mut cancelled: HashMap<farm_core::JobId, bool> = HashMap::new();
    for held in batch {
        let job = held.spec.task.job;
        let is_cancelled = match cancelled.get(&job) {
            Some(c) => *c,
            None => {
                let c = worker.queue.is_cancelled(job).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot check cancellation");
                    false
                });
                cancelled.insert(job, c);
                c
            }
        };
        if is_cancelled {
            tracing::info!(%job, index = held.spec.task.index, "job cancelled before start; skipping");
            ack(worker, &[held.id]).await;
        } else {
            live.push(held);
        }
    }
    let Some(first) = live.first() else {
        return;
    };
    let span = tracing::info_span!(
        "batch",
        size = live.len(),
        job = %first.spec.task.job,
        first_index = first.spec.task.index
    );
    async {
        let id = worker.config.id.clone();
        let started: Vec<Event> = live
            .iter()
            .map(|held| Event::Started {
                task: held.spec.task,
                attempt: held.spec.attempt,
                worker: id.clone(),
            })
            .collect();
        publish(worker, &started).await;
        if let Ok(mut running) = worker.running.lock() {
            for held in &live {
                running.insert(held.spec.task, held.spec.attempt);
            }
        }
        let specs: Vec<&TaskSpec> = live.iter().map(|h| &h.spec).collect();
        worker.batches.fetch_add(1, Ordering::Relaxed);
        let outcomes = execute(worker, &specs).await;
        // Every result of the batch goes out in one round trip, then one acknowledgement.
        let (mut results, mut handled, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
        for (held, outcome) in live.iter().zip(outcomes) {
            let (task, attempt) = (held.spec.task, held.spec.attempt);
            let span = tracing::info_span!("task", job = %task.job, index = task.index, %attempt, seed = held.spec.seed);
            let _enter = span.enter();
            if let Ok(mut running) = worker.running.lock() {
                running.remove(&task);
            }
            let event = match outcome {
                Outcome::Done {
                    object_key,
                    sha256,
                    size_bytes,
                    timings,
                } => {
                    worker.done.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(key = %object_key, render_ms = timings.render_ms, "task succeeded");
                    Event::Succeeded {
                        task,
                        attempt,
                        worker: id.clone(),
                        object_key,
                        sha256,
                        size_bytes,
                        timings,
                    }
                }
                Outcome::Cancelled => {
                    tracing::info!("task cancelled");
                    dropped.push(held.id.clone());
                    continue;
                }
                Outcome::Failed { error, retryable } => {
                    worker.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retryable, "task failed");
                    Event::Failed {
                        task,
                        attempt,
                        worker: id.clone(),
                        error,
                        retryable,
                    }
                }
            };
            results.push(event);
            handled.push(held.id.clone());
        }
        ack(worker, &dropped).await;
        if publish(worker, &results).await {
            ack(worker, &handled).await;
        }
        // If the results could not be published, the messages stay unacknowledged and the
        // tasks' leases bring them back.
    }
    .instrument(span)
    .await
}

/// Publishes events (in one round trip), retrying with backoff; false if it gave up.
async fn publish(worker: &Worker, events: &[Event]) -> bool {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match worker.queue.publish_all(events).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "publishing event failed");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    false
}

async fn ack(worker: &Worker, ids: &[String]) {
    if let Err(e) = worker.queue.ack_tasks(&worker.config.id, ids).await {
        tracing::warn!(error = %e, "ack failed");
    }
}

/// Fetches and decodes an input image (init image or mask) from storage.
async fn input_image(worker: &Worker, key: &str) -> Result<RgbImage, TaskError> {
    let bytes = worker.storage.get(key).await?;
    let decoded = image::load_from_memory(&bytes).map_err(|e| TaskError::Input {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    let rgb = decoded.to_rgb8();
    Ok(RgbImage {
        width: rgb.width(),
        height: rgb.height(),
        pixels: rgb.into_raw(),
    })
}

/// Polls the job's cancel mark until stopped; the flag it sets is read between steps.
pub(crate) fn cancel_poller(
    worker: &Worker,
    job: farm_core::JobId,
) -> (
    Arc<AtomicBool>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (all, _, stop, handle) = cancel_poller_many(worker, vec![job]);
    (all, stop, handle)
}

type JobSet = Arc<Mutex<std::collections::HashSet<farm_core::JobId>>>;

/// Polls the cancel marks of a batch's jobs until stopped: collects the cancelled jobs, and
/// sets the flag (read between steps) once every job is cancelled.
fn cancel_poller_many(
    worker: &Worker,
    mut jobs: Vec<farm_core::JobId>,
) -> (
    Arc<AtomicBool>,
    JobSet,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    jobs.sort_by_key(|j| j.0);
    jobs.dedup();
    let all = Arc::new(AtomicBool::new(false));
    let cancelled: JobSet = Arc::default();
    let stop = CancellationToken::new();
    let (queue, flag, set, token) = (
        worker.queue.clone(),
        all.clone(),
        cancelled.clone(),
        stop.clone(),
    );
    let handle = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(CANCEL_POLL) => {}
            }
            for job in &jobs {
                if let Ok(true) = queue.is_cancelled(*job).await {
                    if let Ok(mut set) = set.lock() {
                        set.insert(*job);
                    }
                }
            }
            let every = set.lock().map(|s| s.len() == jobs.len()).unwrap_or(false);
            if every {
                flag.store(true, Ordering::Relaxed);
                return;
            }
        }
    });
    (all, cancelled, stop, handle)
}

/// Renders a batch of tasks with equal batch keys (or one fine-tuning task); one outcome
/// per task, in order.
async fn execute(worker: &Arc<Worker>, specs: &[&TaskSpec]) -> Vec<Outcome> {
    let Some(first) = specs.first() else {
        return Vec::new();
    };
    if let (Some(train), 1) = (&first.train, specs.len()) {
        return vec![finetune::execute(worker, first, train).await.into()];
    }
    if worker.config.pipeline == Pipeline::Null {
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            out.push(execute_null(worker, spec).await.into());
        }
        return out;
    }
    match render(worker, specs).await {
        Ok(outcomes) => outcomes,
        Err(e) => vec![Outcome::from(Err(e)); specs.len()],
    }
}

/// Stable Diffusion for a batch: loads the model and inputs once, renders every image in one
/// `generate_batch`, then encodes and uploads each. An error here is the whole batch's.
async fn render(worker: &Arc<Worker>, specs: &[&TaskSpec]) -> Result<Vec<Outcome>, TaskError> {
    let first = specs[0];
    let started = Instant::now();
    let loads = worker.models.state().loads;
    let model = worker
        .models
        .get(&first.model, first.vae.as_deref())
        .await?;
    if worker.models.state().loads != loads {
        // Tell the coordinator what this cache holds now, before these tasks end.
        worker.beat_now.notify_one();
    }
    let init_image = match &first.init_image {
        Some(key) => Some(input_image(worker, key).await?),
        None => None,
    };
    let mask = match &first.mask {
        Some(key) => Some(input_image(worker, key).await?),
        None => None,
    };
    let load_ms = started.elapsed().as_millis() as u64;

    // Cancellation: a poller flips a flag, read between steps, once every job is cancelled;
    // a batch with some jobs still wanted runs on and drops the cancelled ones' images.
    let (all_cancelled, cancelled_jobs, stop_polling, poller) =
        cancel_poller_many(worker, specs.iter().map(|s| s.task.job).collect());
    // Progress: the render thread sends every step; this task forwards them throttled, for
    // every task of the batch.
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
    let forwarder = {
        let worker = worker.clone();
        let tasks: Vec<(TaskRef, Attempt)> = specs.iter().map(|s| (s.task, s.attempt)).collect();
        tokio::spawn(async move {
            let min_gap = Duration::from_secs(1) / PROGRESS_PER_SEC;
            let mut last: Option<Instant> = None;
            while let Some((step, total)) = progress_rx.recv().await {
                let due = last.is_none_or(|t| t.elapsed() >= min_gap) || step == total;
                if !due {
                    continue;
                }
                last = Some(Instant::now());
                for (task, attempt) in &tasks {
                    let event = Event::Progress {
                        task: *task,
                        attempt: *attempt,
                        worker: worker.config.id.clone(),
                        step: step as u32,
                        total_steps: total as u32,
                        loss: None,
                    };
                    if let Err(e) = worker.queue.publish(&event).await {
                        tracing::debug!(error = %e, "progress event dropped");
                    }
                }
            }
        })
    };

    let request = Request {
        mode: models::mode(first.mode),
        width: first.width as usize,
        height: first.height as usize,
        steps: first.steps as usize,
        guidance_scale: first.guidance_scale,
        scheduler: models::scheduler(first.scheduler),
        strength: first.strength,
        init_image,
        mask,
        ..Request::default()
    };
    let items: Vec<BatchItem> = specs
        .iter()
        .map(|s| BatchItem {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            seed: s.seed,
        })
        .collect();
    let render_started = Instant::now();
    let flag = all_cancelled.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let mut on_step = |step: usize, total: usize| {
            let _ = progress_tx.send((step, total));
            !flag.load(Ordering::Relaxed)
        };
        model.generate_batch(&request, &items, &mut on_step)
    })
    .await;
    stop_polling.cancel();
    let _ = poller.await;
    let _ = forwarder.await;
    let images = match rendered? {
        Ok(images) if images.len() == specs.len() => images,
        Ok(images) => {
            return Err(TaskError::Render(DiffusionError::InvalidInput(format!(
                "{} images rendered for {} tasks",
                images.len(),
                specs.len()
            ))))
        }
        Err(DiffusionError::Cancelled) => return Err(TaskError::Cancelled),
        Err(e) => return Err(TaskError::Render(e)),
    };
    let render_ms = render_started.elapsed().as_millis() as u64;
    let cancelled = cancelled_jobs.lock().map(|s| s.clone()).unwrap_or_default();

    let mut outcomes = Vec::with_capacity(specs.len());
    for (spec, image) in specs.iter().zip(images) {
        if cancelled.contains(&spec.task.job) {
            outcomes.push(Outcome::Cancelled);
            continue;
        }
        outcomes.push(
            upload(worker, spec, &image)
                .await
                .map(|(sha256, size, upload_ms)| {
                    (
                        spec.object_key.clone(),
                        sha256,
                        size,
                        Timings {
                            load_ms,
                            render_ms,
                            upload_ms,
                        },
                    )
                })
                .into(),
        );
    }
    Ok(outcomes)
}

/// Encodes one rendered image as PNG with its parameters and uploads it: (sha256, bytes,
/// upload ms).
async fn upload(
    worker: &Worker,
    spec: &TaskSpec,
    image: &RgbImage,
) -> Result<(String, u64, u64), TaskError> {
    let png = png::encode(image, &png::Parameters::of(spec))
        .map_err(|e| TaskError::Encode(e.to_string()))?;
    let sha256 = hex::encode(Sha256::digest(&png));
    let size = png.len() as u64;
    let upload_started = Instant::now();
    worker
        .storage
        .put_with_retry(&spec.object_key, Bytes::from(png), UPLOAD_TRIES)
        .await?;
    Ok((sha256, size, upload_started.elapsed().as_millis() as u64))
}

/// The `null` pipeline's image: an 8×8 grey PNG, encoded once.
fn null_png() -> &'static [u8] {
    static PNG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PNG.get_or_init(|| {
        let image = RgbImage {
            width: 8,
            height: 8,
            pixels: vec![128; 8 * 8 * 3],
        };
        png::encode_with_text(&image, "farm null pipeline").unwrap_or_default()
    })
}

/// Benchmark-only: no model and no rendering; uploads the fixed PNG like a real result.
async fn execute_null(
    worker: &Arc<Worker>,
    spec: &TaskSpec,
) -> Result<(String, String, u64, Timings), TaskError> {
    let png = null_png();
    let sha256 = hex::encode(Sha256::digest(png));
    let upload_started = Instant::now();
    worker
        .storage
        .put_with_retry(&spec.object_key, Bytes::from_static(png), UPLOAD_TRIES)
        .await?;
    Ok((
        spec.object_key.clone(),
        sha256,
        png.len() as u64,
        Timings {
            load_ms: 0,
            render_ms: 0,
            upload_ms: upload_started.elapsed().as_millis() as u64,
        },
    ))
}
