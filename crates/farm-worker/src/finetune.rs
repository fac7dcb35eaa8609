//! Finetune tasks: train the UNet on a dataset from storage, checkpoint to storage (so a
//! killed worker's job resumes elsewhere), then publish the model under its new name.
//!
//! Storage layout, under the farm's prefix:
//! - `jobs/{job}/checkpoints/{step:08}/...`: a checkpoint (UNet, optimizer state, trainer
//!   state), and `jobs/{job}/checkpoints/latest` holding the step of the last complete one,
//!   written after its files.
//! - `models/{name}/...`: the published model (diffusers layout); `model_index.json` is
//!   written last, so a model without it is incomplete and invisible.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use farm_core::{TaskSpec, TrainSpec};
use farm_diffusion::train::{AdamWConfig, TrainConfig, Trainer};
use farm_queue::{Event, Timings};
use sha2::{Digest, Sha256};

use crate::{cancel_poller, TaskError, Worker, PROGRESS_PER_SEC, UPLOAD_TRIES};

type Outcome = Result<(String, String, u64, Timings), TaskError>;

fn io(context: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::Io(format!("{context}: {e}"))
}

/// Downloads every object under `prefix` into `dir`, keeping relative paths.
async fn download(worker: &Worker, prefix: &str, dir: &Path) -> Result<usize, TaskError> {
    let keys = worker.storage.list(prefix).await?;
    for key in &keys {
        let Some(relative) = key.strip_prefix(&format!("{prefix}/")) else {
            continue;
        };
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("cannot create a folder", e))?;
        }
        let bytes = worker.storage.get(key).await?;
        std::fs::write(&path, &bytes).map_err(|e| io("cannot write a downloaded file", e))?;
    }
    Ok(keys.len())
}

/// Uploads every file under `dir` to `prefix`, `last` (a relative path) after all others.
async fn upload(
    worker: &Worker,
    dir: &Path,
    prefix: &str,
    last: Option<&str>,
) -> Result<u64, TaskError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| io("cannot list a folder", e))? {
            let path = entry.map_err(|e| io("cannot list a folder", e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let relative = |p: &Path| {
        p.strip_prefix(dir)
            .map(|r| r.to_string_lossy().replace('\\', "/"))
            .unwrap_or_default()
    };
    files.sort_by_key(|p| Some(relative(p).as_str()) == last);
    let mut bytes_total = 0;
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| io("cannot read a file to upload", e))?;
        bytes_total += bytes.len() as u64;
        let key = format!("{prefix}/{}", relative(&path));
        worker
            .storage
            .put_with_retry(&key, Bytes::from(bytes), UPLOAD_TRIES)
            .await?;
    }
    Ok(bytes_total)
}

/// Runs `f` on the trainer in a blocking thread and hands the trainer back.
async fn blocking<T: Send + 'static>(
    trainer: Trainer,
    f: impl FnOnce(&mut Trainer) -> farm_diffusion::Result<T> + Send + 'static,
) -> Result<(Trainer, T), TaskError> {
    let (trainer, result) = tokio::task::spawn_blocking(move || {
        let mut trainer = trainer;
        let result = f(&mut trainer);
        (trainer, result)
    })
    .await?;
    Ok((trainer, result.map_err(TaskError::Train)?))
}

pub(crate) async fn execute(worker: &Arc<Worker>, spec: &TaskSpec, train: &TrainSpec) -> Outcome {
    let started = Instant::now();
    let prefix = &worker.config.redis_prefix;
    let job = spec.task.job;
    let work = std::env::temp_dir().join(format!("farm-train-{job}-{}", spec.attempt));
    let _ = std::fs::remove_dir_all(&work);
    let result = train_in(worker, spec, train, &work, prefix, started).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn train_in(
    worker: &Arc<Worker>,
    spec: &TaskSpec,
    train: &TrainSpec,
    work: &Path,
    prefix: &str,
    started: Instant,
) -> Outcome {
    let job = spec.task.job;
    let base = worker.models.local_dir(&spec.model).await?;
    let data = work.join("data");
    std::fs::create_dir_all(&data).map_err(|e| io("cannot create the work folder", e))?;
    let dataset = train.dataset.as_deref().ok_or_else(|| {
        TaskError::Train(farm_diffusion::DiffusionError::InvalidInput(
            "no dataset".into(),
        ))
    })?;
    if download(worker, dataset, &data).await? == 0 {
        return Err(TaskError::Train(
            farm_diffusion::DiffusionError::InvalidInput(format!("dataset {dataset} is empty")),
        ));
    }

    // The last complete checkpoint of an earlier attempt, if any.
    let checkpoints = format!("{prefix}/jobs/{job}/checkpoints");
    let latest_key = format!("{checkpoints}/latest");
    let resume_from: Option<PathBuf> = if worker.storage.exists(&latest_key).await? {
        let latest = worker.storage.get(&latest_key).await?;
        let step = String::from_utf8_lossy(&latest).trim().to_string();
        let dir = work.join("resume");
        download(worker, &format!("{checkpoints}/{step}"), &dir).await?;
        tracing::info!(step = %step, "resuming from the last checkpoint");
        Some(dir)
    } else {
        None
    };

    let mut config = TrainConfig::new(base, data);
    config.batch_size = train.batch_size as usize;
    config.resolution = train.resolution.map(|r| r as usize);
    config.seed = spec.seed;
    config.adamw = AdamWConfig {
        lr: train.learning_rate,
        ..AdamWConfig::default()
    };
    let device = worker.models.device().clone();
    let mut trainer = tokio::task::spawn_blocking(move || Trainer::new(&config, &device))
        .await?
        .map_err(TaskError::Train)?;
    if let Some(dir) = resume_from {
        trainer = blocking(trainer, move |t| t.resume(&dir)).await?.0;
    }
    let load_ms = started.elapsed().as_millis() as u64;

    let (cancelled, stop_polling, poller) = cancel_poller(worker, job);
    let total = u64::from(train.steps);
    let every = u64::from(train.checkpoint_every.max(1));
    let min_gap = Duration::from_secs(1) / PROGRESS_PER_SEC;
    let mut last_progress: Option<Instant> = None;
    let train_started = Instant::now();
    let outcome: Result<Trainer, TaskError> = async {
        while trainer.step_count() < total {
            if cancelled.load(Ordering::Relaxed) {
                return Err(TaskError::Cancelled);
            }
            let (t, report) = blocking(trainer, |t| t.step()).await?;
            trainer = t;
            if last_progress.is_none_or(|at| at.elapsed() >= min_gap) || report.step == total {
                last_progress = Some(Instant::now());
                let event = Event::Progress {
                    task: spec.task,
                    attempt: spec.attempt,
                    worker: worker.config.id.clone(),
                    step: report.step as u32,
                    total_steps: total as u32,
                    loss: Some(report.loss),
                };
                if let Err(e) = worker.queue.publish(&event).await {
                    tracing::debug!(error = %e, "progress event dropped");
                }
            }
            if report.step % every == 0 && report.step < total {
                let name = format!("{:08}", report.step);
                let dir = work.join("checkpoints").join(&name);
                let target = dir.clone();
                trainer = blocking(trainer, move |t| t.save_checkpoint(&target))
                    .await?
                    .0;
                upload(worker, &dir, &format!("{checkpoints}/{name}"), None).await?;
                worker
                    .storage
                    .put_with_retry(&latest_key, Bytes::from(name.clone()), UPLOAD_TRIES)
                    .await?;
                let _ = std::fs::remove_dir_all(&dir);
                tracing::info!(step = report.step, "checkpoint stored");
            }
        }
        Ok(trainer)
    }
    .await;
    stop_polling.cancel();
    let _ = poller.await;
    let trainer = outcome?;
    let render_ms = train_started.elapsed().as_millis() as u64;

    // Publish: the whole model folder, model_index.json last.
    let out = work.join("model");
    let target = out.clone();
    blocking(trainer, move |t| t.save_model(&target)).await?;
    let upload_started = Instant::now();
    let published = farm_core::published_model_dir(prefix, &train.output_model);
    let size = upload(worker, &out, &published, Some("model_index.json")).await?;
    let weights = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors"))
        .map_err(|e| io("cannot read the trained UNet", e))?;
    let sha256 = hex::encode(Sha256::digest(&weights));
    tracing::info!(model = %train.output_model, "model published");
    Ok((
        format!("{published}/model_index.json"),
        sha256,
        size,
        Timings {
            load_ms,
            render_ms,
            upload_ms: upload_started.elapsed().as_millis() as u64,
        },
    ))
}
