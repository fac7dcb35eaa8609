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
use farm_diffusion::{DiffusionError, Request, RgbImage};
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
}

/// Runs a worker until `shutdown` is cancelled, then lets the tasks in hand finish.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(config.concurrency >= 1, "--concurrency must be at least 1");
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
    let worker = Arc::new(Worker {
        models: ModelCache::new(config.models_root.clone(), device)
            .with_published(storage.clone(), &config.redis_prefix),
        config,
        queue,
        storage,
        running: Mutex::new(HashMap::new()),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    tracing::info!(worker = %worker.config.id, concurrency = worker.config.concurrency, device = %worker.config.device, "worker started");

    let heartbeat = tokio::spawn(heartbeats(worker.clone(), shutdown.clone()));
    let slots = Arc::new(Semaphore::new(worker.config.concurrency));
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.context("slot semaphore closed")?,
        };
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = worker.queue.read_tasks(&worker.config.id, 1, Duration::from_secs(2)) => r,
        };
        let deliveries = match read {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading tasks failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(delivery) = deliveries.into_iter().next() else {
            continue;
        };
        let worker = worker.clone();
        in_flight.spawn(async move {
            handle(&worker, delivery).await;
            drop(permit);
        });
        while in_flight.try_join_next().is_some() {}
    }
    tracing::info!(
        in_flight = in_flight.len(),
        "worker stopping; finishing tasks in hand"
    );
    while in_flight.join_next().await.is_some() {}
    heartbeat.abort();
    Ok(())
}

async fn heartbeats(worker: Arc<Worker>, shutdown: CancellationToken) {
    loop {
        let info = WorkerInfo {
            worker: worker.config.id.clone(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            device: worker.config.device.clone(),
            concurrency: worker.config.concurrency as u32,
            models: worker.models.loaded(),
            available: worker.models.available(),
            running: worker
                .running
                .lock()
                .map(|r| r.iter().map(|(t, a)| (*t, *a)).collect())
                .unwrap_or_default(),
            tasks_done: worker.done.load(Ordering::Relaxed),
            tasks_failed: worker.failed.load(Ordering::Relaxed),
        };
        if let Err(e) = worker.queue.publish(&Event::Heartbeat(info)).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
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

async fn handle(worker: &Arc<Worker>, delivery: Delivery<TaskSpec>) {
    let spec = match delivery.message {
        Ok(spec) => spec,
        Err(bad) => {
            tracing::warn!(id = %bad.id, reason = %bad.reason, "malformed task dead-lettered");
            if let Err(e) = worker.queue.dead_letter(true, &bad).await {
                tracing::warn!(error = %e, "dead-lettering failed");
            }
            return;
        }
    };
    let span = tracing::info_span!("task", job = %spec.task.job, index = spec.task.index, attempt = %spec.attempt, seed = spec.seed);
    async {
        let id = worker.config.id.clone();
        let (task, attempt) = (spec.task, spec.attempt);
        match worker.queue.is_cancelled(task.job).await {
            Ok(true) => {
                tracing::info!("job cancelled before start; skipping");
                ack(worker, &delivery.id).await;
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check cancellation"),
        }
        publish(
            worker,
            &Event::Started {
                task,
                attempt,
                worker: id.clone(),
            },
        )
        .await;
        if let Ok(mut running) = worker.running.lock() {
            running.insert(task, attempt);
        }
        let outcome = execute(worker, &spec).await;
        if let Ok(mut running) = worker.running.lock() {
            running.remove(&task);
        }
        let event = match outcome {
            Ok((object_key, sha256, size_bytes, timings)) => {
                worker.done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key = %object_key, render_ms = timings.render_ms, "task succeeded");
                Event::Succeeded {
                    task,
                    attempt,
                    worker: id,
                    object_key,
                    sha256,
                    size_bytes,
                    timings,
                }
            }
            Err(TaskError::Cancelled) => {
                tracing::info!("task cancelled");
                ack(worker, &delivery.id).await;
                return;
            }
            Err(e) => {
                worker.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retryable = e.retryable(), "task failed");
                Event::Failed {
                    task,
                    attempt,
                    worker: id,
                    error: e.to_string(),
                    retryable: e.retryable(),
                }
            }
        };
        if publish(worker, &event).await {
            ack(worker, &delivery.id).await;
        }
        // If the result could not be published, the message stays unacknowledged and the
        // task's lease brings it back.
    }
    .instrument(span)
    .await
}

async fn publish(worker: &Worker, event: &Event) -> bool {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match worker.queue.publish(event).await {
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

async fn ack(worker: &Worker, id: &str) {
    if let Err(e) = worker.queue.ack_tasks(&[id.to_string()]).await {
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
    let cancelled = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let (queue, flag, token) = (worker.queue.clone(), cancelled.clone(), stop.clone());
    let handle = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(CANCEL_POLL) => {}
            }
            if let Ok(true) = queue.is_cancelled(job).await {
                flag.store(true, Ordering::Relaxed);
                return;
            }
        }
    });
    (cancelled, stop, handle)
}

async fn execute(
    worker: &Arc<Worker>,
    spec: &TaskSpec,
) -> Result<(String, String, u64, Timings), TaskError> {
    if let Some(train) = &spec.train {
        return finetune::execute(worker, spec, train).await;
    }
    if worker.config.pipeline == Pipeline::Null {
        return execute_null(worker, spec).await;
    }
    let started = Instant::now();
    let model = worker.models.get(&spec.model, spec.vae.as_deref()).await?;
    let init_image = match &spec.init_image {
        Some(key) => Some(input_image(worker, key).await?),
        None => None,
    };
    let mask = match &spec.mask {
        Some(key) => Some(input_image(worker, key).await?),
        None => None,
    };
    let load_ms = started.elapsed().as_millis() as u64;

    // Cancellation: a poller flips a flag that the render loop reads between steps.
    let (cancelled, stop_polling, poller) = cancel_poller(worker, spec.task.job);
    // Progress: the render thread sends every step; this task forwards them throttled.
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
    let forwarder = {
        let (worker, task, attempt) = (worker.clone(), spec.task, spec.attempt);
        tokio::spawn(async move {
            let min_gap = Duration::from_secs(1) / PROGRESS_PER_SEC;
            let mut last: Option<Instant> = None;
            while let Some((step, total)) = progress_rx.recv().await {
                let due = last.is_none_or(|t| t.elapsed() >= min_gap) || step == total;
                if !due {
                    continue;
                }
                last = Some(Instant::now());
                let event = Event::Progress {
                    task,
                    attempt,
                    worker: worker.config.id.clone(),
                    step: step as u32,
                    total_steps: total as u32,
                    loss: None,
                };
                if let Err(e) = worker.queue.publish(&event).await {
                    tracing::debug!(error = %e, "progress event dropped");
                }
            }
        })
    };

    let request = Request {
        mode: models::mode(spec.mode),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        width: spec.width as usize,
        height: spec.height as usize,
        steps: spec.steps as usize,
        guidance_scale: spec.guidance_scale,
        scheduler: models::scheduler(spec.scheduler),
        seed: spec.seed,
        num_images: 1,
        strength: spec.strength,
        init_image,
        mask,
        noise: None,
        vae_noise: None,
    };
    let render_started = Instant::now();
    let flag = cancelled.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let mut on_step = |step: usize, total: usize| {
            let _ = progress_tx.send((step, total));
            !flag.load(Ordering::Relaxed)
        };
        model.generate(&request, &mut on_step)
    })
    .await;
    stop_polling.cancel();
    let _ = poller.await;
    let _ = forwarder.await;
    let image = match rendered? {
        Ok(mut images) if !images.is_empty() => images.swap_remove(0),
        Ok(_) => {
            return Err(TaskError::Render(DiffusionError::InvalidInput(
                "no image rendered".into(),
            )))
        }
        Err(DiffusionError::Cancelled) => return Err(TaskError::Cancelled),
        Err(e) => return Err(TaskError::Render(e)),
    };
    let render_ms = render_started.elapsed().as_millis() as u64;

    let png = png::encode(&image, &png::Parameters::of(spec))
        .map_err(|e| TaskError::Encode(e.to_string()))?;
    let sha256 = hex::encode(Sha256::digest(&png));
    let size = png.len() as u64;
    let upload_started = Instant::now();
    worker
        .storage
        .put_with_retry(&spec.object_key, Bytes::from(png), UPLOAD_TRIES)
        .await?;
    let upload_ms = upload_started.elapsed().as_millis() as u64;
    Ok((
        spec.object_key.clone(),
        sha256,
        size,
        Timings {
            load_ms,
            render_ms,
            upload_ms,
        },
    ))
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
