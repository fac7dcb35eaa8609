//! Store rows ↔ protobuf messages.

use chrono::{DateTime, Utc};
use farm_core::{JobRequest, JobSpec, JobStatus, TaskStatus};
use farm_proto::v1 as pb;

use crate::store::{JobRow, TaskRow, WorkerRow};

pub(crate) fn ms(t: Option<DateTime<Utc>>) -> i64 {
    t.map(|t| t.timestamp_millis()).unwrap_or(0)
}

pub(crate) fn job_status(s: JobStatus) -> pb::JobStatus {
    match s {
        JobStatus::Pending => pb::JobStatus::Pending,
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Succeeded => pb::JobStatus::Succeeded,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::Cancelled => pb::JobStatus::Cancelled,
    }
}

pub(crate) fn job_status_filter(s: pb::JobStatus) -> Option<JobStatus> {
    match s {
        pb::JobStatus::Unspecified => None,
        pb::JobStatus::Pending => Some(JobStatus::Pending),
        pb::JobStatus::Running => Some(JobStatus::Running),
        pb::JobStatus::Succeeded => Some(JobStatus::Succeeded),
        pb::JobStatus::Failed => Some(JobStatus::Failed),
        pb::JobStatus::Cancelled => Some(JobStatus::Cancelled),
    }
}

pub(crate) fn task_status(s: TaskStatus) -> pb::TaskStatus {
    match s {
        TaskStatus::Pending => pb::TaskStatus::Pending,
        TaskStatus::Queued => pb::TaskStatus::Queued,
        TaskStatus::Running => pb::TaskStatus::Running,
        TaskStatus::Succeeded => pb::TaskStatus::Succeeded,
        TaskStatus::Failed => pb::TaskStatus::Failed,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
    }
}

/// The raw request; `init_image` and `mask` are what their uploaded bytes' headers say.
pub(crate) fn request_from_pb(
    spec: pb::JobSpec,
    idempotency_key: String,
    init_image: Option<farm_core::ImageInfo>,
    mask: Option<farm_core::ImageInfo>,
    dataset_files: usize,
) -> JobRequest {
    let mode_is_finetune = spec.mode == "finetune";
    JobRequest {
        mode: spec.mode,
        model: spec.model,
        prompts: spec.prompts,
        negative_prompt: spec.negative_prompt,
        seeds: spec.seeds,
        seed_range: spec.seed_range.map(|r| (r.start, r.count)),
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        guidance_scale: spec.guidance_scale,
        scheduler: spec.scheduler,
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        idempotency_key,
        strength: spec.strength,
        vae: spec.vae,
        init_image,
        mask,
        webhook_url: spec.webhook_url,
        train: (mode_is_finetune || !spec.output_model.is_empty()).then_some(
            farm_core::TrainRequest {
                output_model: spec.output_model,
                steps: spec.train_steps,
                batch_size: spec.batch_size,
                learning_rate: spec.learning_rate,
                resolution: spec.resolution,
                checkpoint_every: spec.checkpoint_every,
                dataset_files,
                dataset_prefix: spec.dataset,
            },
        ),
    }
}

pub(crate) fn spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        mode: spec.mode.as_str().to_string(),
        model: spec.model.clone(),
        prompts: spec.prompts.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        seeds: spec.seeds.clone(),
        seed_range: None,
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        guidance_scale: Some(spec.guidance_scale),
        scheduler: spec.scheduler.as_str().to_string(),
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        strength: Some(spec.strength),
        vae: spec.vae.clone().unwrap_or_default(),
        init_image_key: spec.init_image.clone().unwrap_or_default(),
        mask_key: spec.mask.clone().unwrap_or_default(),
        webhook_url: spec.webhook_url.clone().unwrap_or_default(),
        output_model: spec
            .train
            .as_ref()
            .map(|t| t.output_model.clone())
            .unwrap_or_default(),
        train_steps: spec.train.as_ref().map(|t| t.steps).unwrap_or_default(),
        batch_size: spec
            .train
            .as_ref()
            .map(|t| t.batch_size)
            .unwrap_or_default(),
        learning_rate: spec.train.as_ref().map(|t| t.learning_rate),
        resolution: spec
            .train
            .as_ref()
            .and_then(|t| t.resolution)
            .unwrap_or_default(),
        checkpoint_every: spec
            .train
            .as_ref()
            .map(|t| t.checkpoint_every)
            .unwrap_or_default(),
        dataset: spec
            .train
            .as_ref()
            .and_then(|t| t.dataset.clone())
            .unwrap_or_default(),
    }
}

pub(crate) fn task_to_pb(t: &TaskRow) -> pb::Task {
    pb::Task {
        index: t.index,
        seed: t.seed,
        prompt: t.prompt.clone(),
        status: task_status(t.status) as i32,
        object_key: t.object_key.clone().unwrap_or_default(),
        sha256: t.sha256.clone().unwrap_or_default(),
        size_bytes: t.size_bytes.unwrap_or(0),
        attempts: t.attempt,
        error: t.error.clone().unwrap_or_default(),
        worker: t.worker.clone().unwrap_or_default(),
        started_at_ms: ms(t.started_at),
        finished_at_ms: ms(t.finished_at),
    }
}

pub(crate) fn job_to_pb(job: &JobRow, tasks: &[TaskRow]) -> pb::Job {
    let running = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Running)
        .count() as u32;
    pb::Job {
        id: job.id.to_string(),
        status: job_status(job.status) as i32,
        spec: Some(spec_to_pb(&job.spec)),
        idempotency_key: job.spec.idempotency_key.clone().unwrap_or_default(),
        tasks_total: job.tasks_total,
        tasks_succeeded: job.tasks_succeeded,
        tasks_failed: job.tasks_failed,
        tasks_cancelled: job.tasks_cancelled,
        tasks_running: running,
        created_at_ms: job.created_at.timestamp_millis(),
        finished_at_ms: ms(job.finished_at),
        tasks: tasks.iter().map(task_to_pb).collect(),
    }
}

pub(crate) fn worker_to_pb(w: &WorkerRow) -> pb::Worker {
    pb::Worker {
        id: w.info.worker.0.clone(),
        hostname: w.info.hostname.clone(),
        device: w.info.device.clone(),
        concurrency: w.info.concurrency,
        running: w.running,
        models: w.info.models.clone(),
        last_seen_ms: w.last_seen.timestamp_millis(),
        online: w.online,
        tasks_done: w.info.tasks_done,
        tasks_failed: w.info.tasks_failed,
        max_batch: w.info.max_batch,
        model_loads: w.info.cache.loads,
        model_evictions: w.info.cache.evictions,
        cache_capacity_bytes: w.info.cache.capacity.unwrap_or(0),
        cache_used_bytes: w.info.cache.used,
        max_pixels: w.info.capabilities.max_pixels.unwrap_or(0),
        device_memory_bytes: w.info.capabilities.device_memory.unwrap_or(0),
        modes: w
            .info
            .capabilities
            .modes
            .iter()
            .map(|m| m.as_str().to_string())
            .collect(),
        draining: w.info.draining,
        batches: w.info.batches,
    }
}
