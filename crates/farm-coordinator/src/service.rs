//! The gRPC API: `farm.v1.JobService`, `farm.v1.ClusterService`, health and reflection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use farm_core::{validate, JobId, TaskRef, TaskStatus};
use farm_proto::v1 as pb;
use farm_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use farm_proto::v1::job_service_server::{JobService, JobServiceServer};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{Authenticator, Caller};
use crate::convert::{job_status_filter, job_to_pb, request_from_pb, task_to_pb, worker_to_pb};
use crate::store::{StoreError, WorkerRow};
use crate::{Shared, Update};

const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a presigned image URL stays valid.
const IMAGE_URL_TTL: Duration = Duration::from_secs(15 * 60);
const WATCH_POLL: Duration = Duration::from_secs(1);
/// Rows committed slightly out of `updated_at` order are still seen by a watcher.
const WATCH_OVERLAP: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<Api>>().await;
    health.set_serving::<ClusterServiceServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = &shared.config.tls {
        let read = |p: &std::path::Path, flag: &str| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
        };
        let identity = tonic::transport::Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        );
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?;
    }
    let api = Api {
        shared,
        auth: Arc::new(Authenticator::default()),
    };
    server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            JobServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ClusterServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    auth: Arc<Authenticator>,
}

impl Api {
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.auth.caller(&self.shared.store, request).await
    }

    /// Whether a model of this name was published to storage by a finetune job.
    async fn published(&self, model: &str) -> Result<bool, Status> {
        let key = format!(
            "{}/model_index.json",
            farm_core::published_model_dir(&self.shared.config.redis_prefix, model)
        );
        self.shared
            .storage
            .exists(&key)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Stores an uploaded dataset under `{prefix}/datasets/{uuid}/` and returns that prefix.
    async fn store_dataset(&self, files: &[pb::DatasetFile]) -> Result<String, Status> {
        let prefix = format!(
            "{}/datasets/{}",
            self.shared.config.redis_prefix,
            uuid::Uuid::new_v4().simple()
        );
        for file in files {
            let name = file.name.as_str();
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && name.len() <= 255
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !plain {
                return Err(Status::invalid_argument(format!(
                    "dataset_files: {name:?} is not a plain file name (letters, digits, '.', '_', '-')"
                )));
            }
            self.shared
                .storage
                .put_with_retry(&format!("{prefix}/{name}"), file.data.clone().into(), 3)
                .await
                .map_err(|e| Status::unavailable(format!("cannot store the dataset: {e}")))?;
        }
        Ok(prefix)
    }

    /// Stores an uploaded input image at `{prefix}/inputs/{sha256}`; `None` for no image.
    async fn store_input(&self, bytes: &[u8]) -> Result<Option<String>, Status> {
        if bytes.is_empty() {
            return Ok(None);
        }
        use sha2::Digest;
        let key = format!(
            "{}/inputs/{}",
            self.shared.config.redis_prefix,
            hex::encode(sha2::Sha256::digest(bytes))
        );
        self.shared
            .storage
            .put_with_retry(&key, bytes.to_vec().into(), 3)
            .await
            .map_err(|e| Status::unavailable(format!("cannot store the input image: {e}")))?;
        Ok(Some(key))
    }

    /// Refuses a job that no online worker admits (size, mode), naming the closest refusal;
    /// with no worker online the job waits for one.
    fn check_capable(workers: &[WorkerRow], spec: &farm_core::JobSpec) -> Result<(), Status> {
        let mut refusal = None;
        for w in workers.iter().filter(|w| w.online && !w.info.draining) {
            match w
                .info
                .capabilities
                .admits(spec.mode, spec.width, spec.height, None)
            {
                Ok(()) => return Ok(()),
                Err(e) => refusal = Some((w.info.worker.clone(), e)),
            }
        }
        match refusal {
            None => Ok(()),
            Some((worker, why)) => Err(Status::failed_precondition(format!(
                "no online worker can take this job (e.g. worker {worker}: {why}); \
                 change width/height or mode, or start a worker with larger --max-pixels or more --modes"
            ))),
        }
    }

    /// The job if the caller may see it; another tenant's job is `NOT_FOUND`, like a missing one.
    async fn visible_job(
        &self,
        caller: &Caller,
        id: JobId,
    ) -> Result<crate::store::JobRow, Status> {
        self.shared
            .store
            .visible_job(id, caller.scope())
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))
    }
}

fn store_status(e: StoreError) -> Status {
    if let StoreError::Quota { .. } = e {
        return Status::resource_exhausted(format!("spec.seeds: {e}"));
    }
    if e.is_unavailable() {
        Status::unavailable(format!("database unavailable: {e}"))
    } else {
        tracing::error!(error = %e, "store error");
        Status::internal(e.to_string())
    }
}

fn parse_job_id(s: &str) -> Result<JobId, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("job_id: {s:?} is not a job id (a UUID)")))
}

fn parse_page_token(s: &str) -> Result<Option<(DateTime<Utc>, Uuid)>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token: not a token from a previous ListJobs");
    let (micros, id) = s.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let ts = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some((ts, id)))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Api {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let invalid = |e: farm_core::InvalidField| Status::invalid_argument(e.to_string());
        let image = |field, bytes: &[u8]| {
            (!bytes.is_empty())
                .then(|| farm_core::inspect_image(field, bytes))
                .transpose()
                .map_err(invalid)
        };
        let init_info = image("init_image", &req.init_image)?;
        let mask_info = image("mask", &req.mask)?;
        let mut spec = validate(&request_from_pb(
            spec,
            req.idempotency_key,
            init_info,
            mask_info,
            req.dataset_files.len(),
        ))
        .map_err(invalid)?;
        let workers = self.shared.store.workers().await.map_err(store_status)?;
        if model_available(&workers, &spec.model) == Some(false)
            && !self.published(&spec.model).await?
        {
            return Err(Status::not_found(format!(
                "model: no online worker has a model folder named {:?}",
                spec.model
            )));
        }
        Self::check_capable(&workers, &spec)?;
        // Inputs are stored under their content hash before the job is written, so a job row
        // never points at an image that is not there.
        spec.init_image = self.store_input(&req.init_image).await?;
        spec.mask = self.store_input(&req.mask).await?;
        if let Some(train) = &mut spec.train {
            let output = &train.output_model;
            if self.published(output).await? || model_available(&workers, output) == Some(true) {
                return Err(Status::already_exists(format!(
                    "output_model: a model named {output:?} already exists; choose another name"
                )));
            }
            if !req.dataset_files.is_empty() {
                train.dataset = Some(self.store_dataset(&req.dataset_files).await?);
            }
        }
        let (job, created) = self
            .shared
            .store
            .submit_with_quota(&spec, &caller.tenant, self.shared.config.tenant_quota)
            .await
            .map_err(store_status)?;
        if created {
            tracing::info_span!("job", job = %job.id, tenant = %caller.tenant).in_scope(|| {
                tracing::info!(tasks = job.tasks_total, model = %spec.model, mode = spec.mode.as_str(), "job submitted")
            });
            if let Ok(mut specs) = self.shared.new_specs.lock() {
                specs.push((job.id, Arc::new(job.spec.clone())));
            }
            self.shared.submitted.notify_one();
        }
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some(job_to_pb(&job, &[])),
            created,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let id = parse_job_id(&req.job_id)?;
        let store = &self.shared.store;
        let job = self.visible_job(&caller, id).await?;
        let tasks = if req.include_tasks {
            store.tasks(id).await.map_err(store_status)?
        } else {
            Vec::new()
        };
        Ok(Response::new(job_to_pb(&job, &tasks)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 50,
            n if n > 1000 => {
                return Err(Status::invalid_argument("page_size: at most 1000"));
            }
            n => n,
        };
        let status = pb::JobStatus::try_from(req.status).map_err(|_| {
            Status::invalid_argument(format!("status: unknown value {}", req.status))
        })?;
        let after = parse_page_token(&req.page_token)?;
        let jobs = self
            .shared
            .store
            .list_jobs(
                caller.scope(),
                job_status_filter(status),
                page_size + 1,
                after,
            )
            .await
            .map_err(store_status)?;
        let more = jobs.len() > page_size as usize;
        let jobs = &jobs[..jobs.len().min(page_size as usize)];
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => format!("{}_{}", last.created_at.timestamp_micros(), last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| job_to_pb(j, &[])).collect(),
            next_page_token,
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = self.caller(&request).await?;
        let id = parse_job_id(&request.into_inner().job_id)?;
        let job = self.visible_job(&caller, id).await?;
        let tasks = self.shared.store.tasks(id).await.map_err(store_status)?;
        let updates = self.shared.updates.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        let span = tracing::info_span!("watch", job = %id);
        tokio::spawn(
            async move {
                if let Err(e) = watch(shared, id, job, tasks, updates, tx.clone()).await {
                    let _ = tx.send(Err(e)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request).await?;
        let id = parse_job_id(&request.into_inner().job_id)?;
        self.visible_job(&caller, id).await?;
        let job = self
            .shared
            .store
            .cancel(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        // Workers check this mark between steps; Postgres already holds the truth.
        if let Err(e) = self.shared.queue.mark_cancelled(id).await {
            tracing::warn!(job = %id, error = %e, "could not tell workers about the cancel");
        }
        tracing::info!(job = %id, "job cancelled");
        let tasks = self.shared.store.tasks(id).await.map_err(store_status)?;
        Ok(Response::new(job_to_pb(&job, &tasks)))
    }

    async fn get_task_image(
        &self,
        request: Request<pb::GetTaskImageRequest>,
    ) -> Result<Response<pb::TaskImage>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let job = parse_job_id(&req.job_id)?;
        self.visible_job(&caller, job).await?;
        let task = self
            .shared
            .store
            .task(TaskRef {
                job,
                index: req.index,
            })
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!("task {} of job {job} not found", req.index))
            })?;
        let key = match (task.status, task.object_key) {
            (TaskStatus::Succeeded, Some(key)) => key,
            (status, _) => {
                return Err(Status::failed_precondition(format!(
                    "task {} of job {job} is {status}; only succeeded tasks have an image",
                    req.index
                )))
            }
        };
        let storage = &self.shared.storage;
        let unavailable = |e: farm_storage::StorageError| Status::unavailable(e.to_string());
        if let Some(url) = storage
            .presigned_get(&key, IMAGE_URL_TTL)
            .await
            .map_err(unavailable)?
        {
            let expires = chrono::Utc::now() + IMAGE_URL_TTL;
            return Ok(Response::new(pb::TaskImage {
                object_key: key,
                png: Vec::new(),
                url,
                url_expires_at_ms: expires.timestamp_millis(),
            }));
        }
        let png = storage.get(&key).await.map_err(unavailable)?;
        Ok(Response::new(pb::TaskImage {
            object_key: key,
            png: png.to_vec(),
            url: String::new(),
            url_expires_at_ms: 0,
        }))
    }
}

/// Feeds one WatchJob stream: the snapshot, then task changes and progress, then the final
/// snapshot when the job ends. Changes are read back from Postgres (so changes applied by other
/// coordinators show too); this coordinator's own updates only wake the loop early.
async fn watch(
    shared: Arc<Shared>,
    id: JobId,
    job: crate::store::JobRow,
    tasks: Vec<crate::store::TaskRow>,
    mut updates: broadcast::Receiver<Update>,
    tx: mpsc::Sender<Result<pb::JobEvent, Status>>,
) -> Result<(), Status> {
    let snapshot = |job: &crate::store::JobRow, tasks: &[crate::store::TaskRow]| pb::JobEvent {
        event: Some(pb::job_event::Event::Snapshot(job_to_pb(job, tasks))),
    };
    let mut since = tasks
        .iter()
        .map(|t| t.updated_at)
        .max()
        .unwrap_or(job.created_at);
    let mut known: HashMap<u32, (TaskStatus, u32)> = tasks
        .iter()
        .map(|t| (t.index, (t.status, t.attempt)))
        .collect();
    let ended = job.status.is_terminal();
    if tx.send(Ok(snapshot(&job, &tasks))).await.is_err() || ended {
        return Ok(());
    }
    loop {
        let mut refresh = false;
        tokio::select! {
            _ = tokio::time::sleep(WATCH_POLL) => refresh = true,
            update = updates.recv() => match update {
                Ok(Update::Progress { task, step, total_steps, worker, loss }) if task.job == id => {
                    let event = pb::JobEvent {
                        event: Some(pb::job_event::Event::Progress(pb::TaskProgress {
                            index: task.index,
                            step,
                            total_steps,
                            worker,
                            loss,
                        })),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Update::Changed(task)) if task.job == id => refresh = true,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => refresh = true,
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
        if !refresh {
            continue;
        }
        let changed = shared
            .store
            .tasks_changed_since(id, since - WATCH_OVERLAP)
            .await
            .map_err(store_status)?;
        for t in changed {
            since = since.max(t.updated_at);
            let state = (t.status, t.attempt);
            if known.get(&t.index) == Some(&state) {
                continue;
            }
            known.insert(t.index, state);
            let event = pb::JobEvent {
                event: Some(pb::job_event::Event::Task(task_to_pb(&t))),
            };
            if tx.send(Ok(event)).await.is_err() {
                return Ok(());
            }
        }
        let job = shared
            .store
            .job(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        if job.status.is_terminal() {
            let tasks = shared.store.tasks(id).await.map_err(store_status)?;
            let _ = tx.send(Ok(snapshot(&job, &tasks))).await;
            return Ok(());
        }
    }
}

#[tonic::async_trait]
impl ClusterService for Api {
    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.caller(&request).await?.require_admin()?;
        let workers = self.shared.store.workers().await.map_err(store_status)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.iter().map(worker_to_pb).collect(),
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::QueueStats>, Status> {
        self.caller(&request).await?.require_admin()?;
        let store = &self.shared.store;
        let counts = store.task_counts().await.map_err(store_status)?;
        let workers = store.workers().await.map_err(store_status)?;
        let online: Vec<_> = workers.iter().filter(|w| w.online).collect();
        let ids: Vec<farm_core::WorkerId> = online.iter().map(|w| w.info.worker.clone()).collect();
        let stream_len = self.shared.queue.dispatch_backlog(&ids).await.unwrap_or(0);
        Ok(Response::new(pb::QueueStats {
            pending: counts.pending,
            queued: counts.queued,
            running: counts.running,
            succeeded: counts.succeeded,
            failed: counts.failed,
            cancelled: counts.cancelled,
            workers_online: online.len() as u32,
            slots_total: online.iter().map(|w| w.info.concurrency).sum(),
            dispatch_stream_length: stream_len,
            oldest_pending_age_ms: counts
                .oldest_pending
                .map(|t| (Utc::now() - t).num_milliseconds())
                .unwrap_or(0),
        }))
    }
}

/// Whether an online worker can load `model`: `None` when no worker is online (nobody to
/// ask), else whether any of them has the folder.
fn model_available(workers: &[WorkerRow], model: &str) -> Option<bool> {
    let mut online = workers.iter().filter(|w| w.online).peekable();
    online.peek()?;
    Some(online.any(|w| w.info.available.iter().any(|m| m == model)))
}
