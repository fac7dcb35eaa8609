//! The coordinator: the farm's only writer of Postgres.
//!
//! It serves the gRPC API ([`service`]), and runs three loops: the dispatcher (pending tasks →
//! Redis, late-bound to free worker slots), the ingester (worker events → Postgres, fenced by
//! attempt) and the reaper (expired leases → requeue or dead letter). Several coordinators may
//! run against one Postgres and Redis.

mod auth;
mod convert;
mod dashboard;
mod http;
mod loops;
mod metrics;
pub mod placement;
mod service;
pub mod store;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use farm_core::TaskRef;
use farm_queue::Queue;
use farm_storage::Storage;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

pub use store::{Store, StoreError};

/// Everything a coordinator needs to know at start.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// PEM CA certificate for a `rediss://` Redis with a private CA.
    pub redis_ca: Option<std::path::PathBuf>,
    pub storage: String,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// This coordinator's consumer name in the event stream; stable across restarts so
    /// unacknowledged events are picked up again.
    pub id: String,
    /// How long a dispatched task may wait in the stream before it is requeued.
    pub queue_lease: Duration,
    /// How long a running task may go without a heartbeat before it is requeued.
    pub run_lease: Duration,
    /// The most unfinished tasks one tenant may have; a submit beyond it is refused with
    /// `RESOURCE_EXHAUSTED`.
    pub tenant_quota: Option<u64>,
    /// PEM certificate chain and private key: serve gRPC over TLS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Signs webhook calls (`x-farm-signature`); unsigned without one.
    pub webhook_secret: Option<String>,
    /// A pending task's effective priority rises by one for each of these it waits (ageing).
    pub ageing: Duration,
    /// How long a task waits for a worker that holds its model before another worker may
    /// evict a model to take it.
    pub spread_after: Duration,
}

impl CoordinatorConfig {
    pub fn new(database_url: &str, redis_url: &str, storage: &str) -> Self {
        CoordinatorConfig {
            database_url: database_url.to_string(),
            redis_url: redis_url.to_string(),
            redis_prefix: "farm".into(),
            redis_ca: None,
            storage: storage.to_string(),
            grpc_addr: ([127, 0, 0, 1], 50051).into(),
            http_addr: ([127, 0, 0, 1], 8080).into(),
            id: "coordinator".into(),
            queue_lease: Duration::from_secs(600),
            run_lease: Duration::from_secs(30),
            tenant_quota: Some(1_000_000),
            tls: None,
            webhook_secret: None,
            ageing: store::DEFAULT_AGEING,
            spread_after: Duration::from_secs(30),
        }
    }
}

/// What watchers hear about, from this coordinator's ingester and reaper.
#[derive(Debug, Clone)]
pub enum Update {
    Changed(TaskRef),
    Progress {
        task: TaskRef,
        step: u32,
        total_steps: u32,
        worker: String,
        /// finetune: the step's training loss.
        loss: Option<f32>,
    },
}

/// The state shared by the gRPC service and the loops.
pub(crate) struct Shared {
    pub store: Store,
    pub queue: Queue,
    pub storage: Storage,
    pub config: CoordinatorConfig,
    pub updates: broadcast::Sender<Update>,
    pub metrics: metrics::Metrics,
    /// Wakes the dispatcher early (tasks finished or came back); such wake-ups are
    /// coalesced.
    pub dispatch_now: Notify,
    /// Wakes the dispatcher at once: new tasks are pending (a submit, a retry).
    pub submitted: Notify,
    /// Specs of jobs this coordinator just wrote, handed to the dispatcher so it need not
    /// read them back.
    pub new_specs: std::sync::Mutex<Vec<(farm_core::JobId, Arc<farm_core::JobSpec>)>>,
    /// Set once the ingester has applied the events that waited while this coordinator was
    /// down; until then the reaper holds off, so heartbeats that arrived meanwhile count.
    pub caught_up: std::sync::atomic::AtomicBool,
}

/// Connects to Postgres (creating the database and applying migrations), Redis and storage,
/// each failure naming what was unreachable and how to start it.
pub async fn connect_store(database_url: &str) -> anyhow::Result<Store> {
    Store::connect(database_url).await.with_context(|| {
        format!(
            "cannot use Postgres at {}; start it (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set FARM_DATABASE_URL",
            farm_core::redact_url(database_url)
        )
    })
}

/// Drops the database `database_url` names (for tests and `farm chaos`).
pub async fn drop_database(database_url: &str) -> anyhow::Result<()> {
    Store::drop_database(database_url).await.map_err(Into::into)
}

pub async fn connect_queue(
    redis_url: &str,
    prefix: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<Queue> {
    let ca_pem = ca
        .map(|p| {
            std::fs::read(p)
                .with_context(|| format!("FARM_REDIS_CA {}: cannot read it", p.display()))
        })
        .transpose()?;
    Queue::connect_with_ca(redis_url, prefix, ca_pem).await.with_context(|| {
        format!(
            "cannot reach Redis at {}; start it (e.g. `redis-server --daemonize yes --port 6379`) or set FARM_REDIS_URL",
            farm_core::redact_url(redis_url)
        )
    })
}

pub async fn open_storage(uri: &str) -> anyhow::Result<Storage> {
    let storage = Storage::open(uri).context("cannot open storage; set FARM_STORAGE")?;
    storage.check().await.with_context(|| {
        format!("cannot reach storage {uri}; check FARM_STORAGE and the AWS_* variables")
    })?;
    Ok(storage)
}

/// A coordinator whose listeners are bound (so `--grpc-addr 127.0.0.1:0` gets a real port)
/// and whose connections are open, ready to [`Bound::run`].
pub struct Bound {
    shared: Arc<Shared>,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
}

impl Bound {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or(self.shared.config.grpc_addr)
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or(self.shared.config.http_addr)
    }

    /// Serves until `shutdown` is cancelled. Returns once its servers and loops stopped.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Bound { shared, grpc, http } = self;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(loops::dispatcher(shared.clone(), shutdown.clone()));
        tasks.spawn(loops::ingester(shared.clone(), shutdown.clone()));
        tasks.spawn(loops::reaper(shared.clone(), shutdown.clone()));
        tasks.spawn(http::serve(shared.clone(), http, shutdown.clone()));
        tasks.spawn(webhooks::deliverer(shared.clone(), shutdown.clone()));
        let served = service::serve(shared, grpc, shutdown.clone()).await;
        shutdown.cancel();
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::error!(error = %e, "coordinator loop failed");
            }
        }
        served
    }
}

/// Connects to Postgres (creating the database, applying migrations), Redis and storage, and
/// binds both listeners.
pub async fn bind(config: CoordinatorConfig) -> anyhow::Result<Bound> {
    let store = connect_store(&config.database_url).await?;
    let queue = connect_queue(
        &config.redis_url,
        &config.redis_prefix,
        config.redis_ca.as_deref(),
    )
    .await?;
    let storage = open_storage(&config.storage).await?;
    let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", config.grpc_addr))?;
    let http = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {}", config.http_addr))?;
    let (updates, _) = broadcast::channel(4096);
    let shared = Arc::new(Shared {
        store,
        queue,
        storage,
        config,
        updates,
        metrics: metrics::Metrics::new()?,
        dispatch_now: Notify::new(),
        submitted: Notify::new(),
        new_specs: Default::default(),
        caught_up: std::sync::atomic::AtomicBool::new(false),
    });
    let bound = Bound { shared, grpc, http };
    tracing::info!(grpc = %bound.grpc_addr(), http = %bound.http_addr(), id = %bound.shared.config.id, "coordinator listening");
    Ok(bound)
}

/// Binds and runs a coordinator until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}
