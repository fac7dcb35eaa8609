//! The web dashboard served at `--http-addr`: overview, jobs, a page per job and workers, live
//! through server-sent events. The HTML, JavaScript and CSS are embedded in the binary; the
//! browser reads everything through the JSON API below, authenticated by the same API tokens as
//! gRPC (kept in an HttpOnly cookie after the login form, or sent as `Authorization: Bearer`).
//! A tenant sees only its own jobs; an admin sees every job.

mod live;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use farm_core::{JobId, TaskRef, TaskStatus};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) use live::Live;

use crate::auth::{Authenticator, Caller};
use crate::store::{JobRow, StoreError, TaskRow};
use crate::{Shared, Update};

const COOKIE: &str = "farm_token";
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
const MAX_PAGE: u32 = 200;
/// The most tasks a job answer carries (the page shows them all up to this).
const MAX_TASKS: usize = 5000;

/// The dashboard's state: the coordinator's, plus its own token cache and live progress.
pub(crate) struct Dashboard {
    pub shared: Arc<Shared>,
    pub auth: Authenticator,
    pub live: Live,
    /// Ends the event streams when the coordinator stops (else graceful shutdown would wait
    /// for every open browser tab).
    pub shutdown: CancellationToken,
}

pub(crate) fn routes(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/login", get(page))
        .route("/jobs", get(page))
        .route("/jobs/{id}", get(page))
        .route("/workers", get(page))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/overview", get(overview))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/retry", post(retry))
        .route("/api/jobs/{id}/tasks/{index}/image", get(image))
        .route("/api/workers", get(workers))
        .route("/api/events", get(events))
        .with_state(dashboard)
}

/// Follows this coordinator's updates into the live progress table (and the step histogram).
pub(crate) async fn track(dashboard: Arc<Dashboard>) {
    let mut updates = dashboard.shared.updates.subscribe();
    loop {
        let update = tokio::select! {
            _ = dashboard.shutdown.cancelled() => return,
            u = updates.recv() => u,
        };
        match update {
            Ok(Update::Progress {
                task,
                step,
                total_steps,
                worker,
                ..
            }) => {
                if let Some(secs) = dashboard.live.progress(task, step, total_steps, &worker) {
                    dashboard.shared.metrics.observe_step(secs);
                }
            }
            Ok(Update::Changed(task)) => dashboard.live.changed(task),
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// An error answer: `{"error": "..."}` with its status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database unavailable: {e}"),
            )
        } else {
            tracing::error!(error = %e, "store error");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let status = match s.code() {
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, s.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The token a request carries: `Authorization: Bearer`, else the dashboard's cookie.
fn request_token(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_string()).filter(|t| !t.is_empty());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The authenticated caller of an API request.
pub(crate) struct Authed(pub Caller);

impl FromRequestParts<Arc<Dashboard>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        dashboard: &Arc<Dashboard>,
    ) -> Result<Self, Self::Rejection> {
        let token = request_token(&parts.headers)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "log in with an API token"))?;
        // Changes come from our own page: a cross-site form cannot set this header.
        if parts.method != axum::http::Method::GET
            && !parts.headers.contains_key("x-farm-request")
            && !parts.headers.contains_key(header::AUTHORIZATION)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "missing x-farm-request header",
            ));
        }
        let caller = dashboard
            .auth
            .caller_token(&dashboard.shared.store, &token)
            .await?;
        Ok(Authed(caller))
    }
}

fn with_security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Every page is the same shell; the script renders the page its path names.
async fn page() -> Response {
    with_security_headers(
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            INDEX_HTML,
        )
            .into_response(),
    )
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

fn cookie_safe(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 512
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
}

fn secure_suffix(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    if https {
        "; Secure"
    } else {
        ""
    }
}

async fn login(
    State(d): State<Arc<Dashboard>>,
    headers: HeaderMap,
    body: Json<LoginBody>,
) -> ApiResult<Response> {
    let token = body.token.trim();
    if !cookie_safe(token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unknown or revoked token",
        ));
    }
    let caller = d.auth.caller_token(&d.shared.store, token).await?;
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000{}",
        secure_suffix(&headers)
    );
    let cookie = HeaderValue::from_str(&cookie)
        .map_err(|_| ApiError::bad_request("token: not a valid cookie value"))?;
    tracing::info!(tenant = %caller.tenant, "dashboard login");
    let mut response = Json(me_json(&caller)).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

async fn logout(headers: HeaderMap) -> Response {
    let cookie = format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        secure_suffix(&headers)
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

fn me_json(caller: &Caller) -> Value {
    json!({ "tenant": caller.tenant, "admin": caller.admin })
}

async fn me(Authed(caller): Authed) -> Json<Value> {
    Json(me_json(&caller))
}

fn time(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// A task as JSON (seeds as strings: JavaScript numbers cannot hold every u64).
pub(crate) fn task_json(t: &TaskRow) -> Value {
    json!({
        "index": t.index,
        "prompt": t.prompt,
        "seed": t.seed.to_string(),
        "status": t.status.as_str(),
        "attempts": t.attempt,
        "worker": t.worker,
        "error": t.error,
        "object_key": t.object_key,
        "sha256": t.sha256,
        "size_bytes": t.size_bytes,
        "started_at": time(t.started_at),
        "finished_at": time(t.finished_at),
    })
}

/// A job as JSON: the dashboard's job answer and the webhook body. `tasks` up to `max_tasks`.
pub(crate) fn job_json(job: &JobRow, tasks: Option<&[TaskRow]>, max_tasks: usize) -> Value {
    let spec = &job.spec;
    let mut v = json!({
        "id": job.id.to_string(),
        "tenant": job.tenant,
        "status": job.status.as_str(),
        "model": spec.model,
        "mode": spec.mode.as_str(),
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "prompt": spec.prompts.first(),
        "prompts": spec.prompts.len(),
        "seeds": spec.seeds.len(),
        "tasks_total": job.tasks_total,
        "tasks_succeeded": job.tasks_succeeded,
        "tasks_failed": job.tasks_failed,
        "tasks_cancelled": job.tasks_cancelled,
        "created_at": time(Some(job.created_at)),
        "finished_at": time(job.finished_at),
    });
    if let Some(tasks) = tasks {
        v["spec"] = serde_json::to_value(spec).unwrap_or(Value::Null);
        v["tasks"] = tasks.iter().take(max_tasks).map(task_json).collect();
        v["tasks_truncated"] = Value::Bool(tasks.len() > max_tasks);
    }
    v
}

fn parse_job(id: &str) -> ApiResult<JobId> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("job {id:?} not found")))
}

async fn visible(d: &Dashboard, caller: &Caller, id: JobId) -> ApiResult<JobRow> {
    d.shared
        .store
        .visible_job(id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

async fn overview(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
) -> ApiResult<Json<Value>> {
    let store = &d.shared.store;
    let o = store.overview(caller.scope()).await?;
    let workers = store.workers().await?;
    let online: Vec<_> = workers.iter().filter(|w| w.online).collect();
    let now = Utc::now();
    let this_minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    let by_minute: HashMap<DateTime<Utc>, (u64, u64)> = o
        .per_minute
        .iter()
        .map(|(t, ok, failed)| (*t, (*ok, *failed)))
        .collect();
    let per_minute: Vec<Value> = (0..60)
        .rev()
        .map(|ago| {
            let t = this_minute - TimeDelta::minutes(ago);
            let (ok, failed) = by_minute.get(&t).copied().unwrap_or((0, 0));
            json!({ "t": t.timestamp_millis(), "succeeded": ok, "failed": failed })
        })
        .collect();
    let (hour_ok, hour_failed) = o
        .per_minute
        .iter()
        .fold((0, 0), |(a, b), (_, ok, f)| (a + ok, b + f));
    let c = &o.counts;
    Ok(Json(json!({
        "tenant": caller.tenant,
        "admin": caller.admin,
        "workers_online": online.len(),
        "workers_total": workers.len(),
        "slots": online.iter().map(|w| w.info.concurrency).sum::<u32>(),
        "busy": online.iter().map(|w| w.running).sum::<u32>(),
        "queue_depth": c.pending + c.queued,
        "counts": {
            "pending": c.pending, "queued": c.queued, "running": c.running,
            "succeeded": c.succeeded, "failed": c.failed, "cancelled": c.cancelled,
        },
        "last_hour": { "succeeded": hour_ok, "failed": hour_failed },
        "models": o.models.iter().map(|m| json!({
            "model": m.model, "pending": m.pending, "queued": m.queued, "running": m.running,
        })).collect::<Vec<_>>(),
        "oldest_waiting": o.oldest_waiting.map(|t| json!({
            "job": t.job.to_string(),
            "index": t.index,
            "since": time(c.oldest_pending),
            "age_secs": c.oldest_pending.map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
        })),
        "per_minute": per_minute,
    })))
}

#[derive(Deserialize)]
struct JobsQuery {
    status: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

async fn jobs(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Json<Value>> {
    let status = match q.status.as_deref().map(str::trim) {
        None | Some("") | Some("all") => None,
        Some(s) => Some(
            s.parse::<farm_core::JobStatus>()
                .map_err(|_| ApiError::bad_request(format!("status: unknown status {s:?}")))?,
        ),
    };
    let limit = q.limit.unwrap_or(25).clamp(1, MAX_PAGE);
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => {
            let bad = || ApiError::bad_request("after: not a cursor from a previous page");
            let (micros, id) = a.split_once('_').ok_or_else(bad)?;
            let micros: i64 = micros.parse().map_err(|_| bad())?;
            let ts = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
            Some((ts, Uuid::parse_str(id).map_err(|_| bad())?))
        }
    };
    let rows = d
        .shared
        .store
        .list_jobs(caller.scope(), status, limit + 1, after)
        .await?;
    let more = rows.len() > limit as usize;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next = match (more, rows.last()) {
        (true, Some(last)) => Value::String(format!(
            "{}_{}",
            last.created_at.timestamp_micros(),
            last.id
        )),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "jobs": rows.iter().map(|j| job_json(j, None, 0)).collect::<Vec<_>>(),
        "next": next,
    })))
}

async fn job_answer(d: &Dashboard, job: &JobRow) -> ApiResult<Value> {
    let tasks = d.shared.store.tasks(job.id).await?;
    let mut v = job_json(job, Some(&tasks), MAX_TASKS);
    let webhooks = d.shared.store.webhook_states(job.id).await?;
    v["webhooks"] = webhooks
        .iter()
        .map(|w| {
            json!({
                "status": w.status,
                "attempts": w.attempts,
                "last_error": w.last_error,
                "response_status": w.response_status,
                "delivered_at": time(w.delivered_at),
            })
        })
        .collect();
    Ok(v)
}

async fn job(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = visible(&d, &caller, parse_job(&id)?).await?;
    Ok(Json(job_answer(&d, &job).await?))
}

async fn cancel(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_job(&id)?;
    visible(&d, &caller, id).await?;
    let job = d
        .shared
        .store
        .cancel(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    if let Err(e) = d.shared.queue.mark_cancelled(id).await {
        tracing::warn!(job = %id, error = %e, "could not tell workers about the cancel");
    }
    tracing::info!(job = %id, tenant = %caller.tenant, "job cancelled from the dashboard");
    d.live.job_ended(id);
    let _ = d
        .shared
        .updates
        .send(Update::Changed(TaskRef { job: id, index: 0 }));
    Ok(Json(job_answer(&d, &job).await?))
}

async fn retry(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_job(&id)?;
    visible(&d, &caller, id).await?;
    let (job, retried) = d
        .shared
        .store
        .retry_failed(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    if retried > 0 {
        tracing::info!(job = %id, retried, tenant = %caller.tenant, "failed tasks retried from the dashboard");
        d.shared.submitted.notify_one();
        let _ = d
            .shared
            .updates
            .send(Update::Changed(TaskRef { job: id, index: 0 }));
    }
    let mut v = job_answer(&d, &job).await?;
    v["retried"] = json!(retried);
    Ok(Json(v))
}

async fn image(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Path((id, index)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id = parse_job(&id)?;
    let index: u32 = index
        .parse()
        .map_err(|_| ApiError::not_found(format!("task {index:?} not found")))?;
    visible(&d, &caller, id).await?;
    let task = d
        .shared
        .store
        .task(TaskRef { job: id, index })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {index} of job {id} not found")))?;
    let key = match (task.status, task.object_key) {
        (TaskStatus::Succeeded, Some(key)) => key,
        (status, _) => {
            return Err(ApiError::not_found(format!(
                "task {index} of job {id} is {status}; only succeeded tasks have an image"
            )))
        }
    };
    let png: Bytes = d
        .shared
        .storage
        .get(&key)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("storage: {e}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // The key names the bytes (same seed and parameters, same image).
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        png,
    )
        .into_response())
}

async fn workers(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
) -> ApiResult<Json<Value>> {
    let rows = d.shared.store.workers().await?;
    let now = Utc::now();
    let list: Vec<Value> = rows
        .iter()
        .map(|w| {
            let current: Vec<Value> = d
                .live
                .of(&w.info.worker.0)
                .iter()
                .map(|t| {
                    json!({
                        // Which job is another tenant's business.
                        "job": caller.admin.then(|| t.task.job.to_string()),
                        "index": t.task.index,
                        "step": t.step,
                        "total_steps": t.total_steps,
                        "secs_per_step": t.secs_per_step,
                        "age_secs": t.at.elapsed().as_secs_f64(),
                    })
                })
                .collect();
            json!({
                "id": w.info.worker.0,
                "hostname": w.info.hostname,
                "device": w.info.device,
                "concurrency": w.info.concurrency,
                "running": w.running,
                "models": w.info.models,
                "available": w.info.available,
                "tasks_done": w.info.tasks_done,
                "tasks_failed": w.info.tasks_failed,
                "max_batch": w.info.max_batch,
                "batches": w.info.batches,
                "model_loads": w.info.cache.loads,
                "model_evictions": w.info.cache.evictions,
                "cache_used_bytes": w.info.cache.used,
                "cache_capacity_bytes": w.info.cache.capacity,
                "draining": w.info.draining,
                "last_seen": time(Some(w.last_seen)),
                "last_seen_secs": (now - w.last_seen).num_milliseconds().max(0) as f64 / 1000.0,
                "online": w.online,
                "current": current,
            })
        })
        .collect();
    Ok(Json(json!({ "workers": list, "admin": caller.admin })))
}

#[derive(Deserialize)]
struct EventsQuery {
    job: Option<String>,
}

/// Server-sent events: `progress` (a task's step) and `changed` (a task's state), for one job
/// or every job the caller may see; `lagged` when some were missed (reload the data).
async fn events(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let only = match q.job.as_deref().filter(|j| !j.is_empty()) {
        Some(j) => {
            let id = parse_job(j)?;
            visible(&d, &caller, id).await?;
            Some(id)
        }
        None => None,
    };
    let updates = d.shared.updates.subscribe();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(feed(d.clone(), caller, only, updates, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell reverse proxies not to buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn feed(
    d: Arc<Dashboard>,
    caller: Caller,
    only: Option<JobId>,
    mut updates: broadcast::Receiver<Update>,
    tx: mpsc::Sender<Event>,
) {
    let mut visible_jobs: HashMap<JobId, bool> = HashMap::new();
    let _ = tx.send(Event::default().event("hello").data("{}")).await;
    loop {
        let update = tokio::select! {
            _ = d.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            u = updates.recv() => u,
        };
        let (job, event) = match update {
            Ok(Update::Progress {
                task,
                step,
                total_steps,
                worker,
                ..
            }) => (
                task.job,
                Event::default().event("progress").json_data(json!({
                    "job": task.job.to_string(),
                    "index": task.index,
                    "step": step,
                    "total_steps": total_steps,
                    "worker": worker,
                })),
            ),
            Ok(Update::Changed(task)) => (
                task.job,
                Event::default().event("changed").json_data(json!({
                    "job": task.job.to_string(),
                    "index": task.index,
                })),
            ),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let lagged = Event::default().event("lagged").data(n.to_string());
                if tx.send(lagged).await.is_err() {
                    return;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if only.is_some_and(|j| j != job) {
            continue;
        }
        if let Some(tenant) = caller.scope() {
            let seen = match visible_jobs.get(&job) {
                Some(v) => *v,
                None => {
                    let v = matches!(
                        d.shared.store.visible_job(job, Some(tenant)).await,
                        Ok(Some(_))
                    );
                    if visible_jobs.len() > 10_000 {
                        visible_jobs.clear();
                    }
                    visible_jobs.insert(job, v);
                    v
                }
            };
            if !seen {
                continue;
            }
        }
        let Ok(event) = event else { continue };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_bearer_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(request_token(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; farm_token=farm_abc; c=d"),
        );
        assert_eq!(request_token(&h).as_deref(), Some("farm_abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer farm_xyz"),
        );
        assert_eq!(request_token(&h).as_deref(), Some("farm_xyz"));
    }

    #[test]
    fn only_plain_tokens_become_cookies() {
        assert!(cookie_safe("farm_0123abcdef"));
        assert!(!cookie_safe(""));
        assert!(!cookie_safe("a;b"));
        assert!(!cookie_safe("a b"));
        assert!(!cookie_safe("a\r\nSet-Cookie: x"));
    }
}
