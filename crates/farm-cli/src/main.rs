//! `farm`: the one binary of the render farm.

mod bench;
mod chaos;
mod client;
mod demo;
mod grid;
mod local;
mod output;
mod train;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use farm_coordinator::CoordinatorConfig;
use farm_core::WorkerId;
use farm_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "farm",
    version,
    about = "A distributed render farm for Stable Diffusion"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Command,
}

/// Where the farm's parts are. Every setting has an environment variable.
#[derive(Args, Clone, Debug)]
pub struct Settings {
    /// Postgres (coordinator only); the database is created if missing.
    #[arg(
        long,
        global = true,
        env = "FARM_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/farm"
    )]
    pub database_url: String,
    #[arg(
        long,
        global = true,
        env = "FARM_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Prefix of every Redis key, so several farms (or tests) can share one Redis.
    #[arg(long, global = true, env = "FARM_REDIS_PREFIX", default_value = "farm")]
    pub redis_prefix: String,
    /// `file:///abs/dir`, a folder path, or `s3://bucket` (with the AWS_* variables).
    #[arg(long, global = true, env = "FARM_STORAGE", default_value = farm_storage::DEFAULT_STORAGE)]
    pub storage: String,
    /// The models root: a model's name is its folder name here.
    #[arg(
        long,
        global = true,
        env = "FARM_MODELS",
        default_value = "./farm-data/models"
    )]
    pub models: PathBuf,
    /// The coordinator's gRPC address, for client commands.
    #[arg(
        long,
        global = true,
        env = "FARM_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// API token for client commands (default: the one `farm dev`/`farm demo` wrote to
    /// ./farm-data/token).
    #[arg(long, global = true, env = "FARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate to trust for a rediss:// FARM_REDIS_URL (default: the system's).
    #[arg(long, global = true, env = "FARM_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// PEM CA certificate to trust for an https:// FARM_COORDINATOR (default: the system's).
    #[arg(long, global = true, env = "FARM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Export traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318).
    #[arg(long, global = true, env = "FARM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true, env = "FARM_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Args, Clone, Debug)]
pub struct ServeAddrs {
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator: gRPC API, dispatcher, event ingester, reaper, HTTP endpoints.
    Coordinator {
        #[command(flatten)]
        addrs: ServeAddrs,
        /// Consumer name in the event stream; keep it stable across restarts.
        #[arg(long, env = "FARM_COORDINATOR_ID", default_value = "coordinator")]
        id: String,
        /// Seconds a dispatched task may wait in the stream before it is requeued.
        #[arg(long, default_value_t = 600)]
        queue_lease_secs: u64,
        /// Seconds a running task may go without a heartbeat before it is requeued.
        #[arg(long, default_value_t = 30)]
        run_lease_secs: u64,
        /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Signs webhook calls: `x-farm-signature: sha256=HMAC-SHA256(secret, "<ts>.<body>")`.
        #[arg(long, env = "FARM_WEBHOOK_SECRET", hide_env_values = true)]
        webhook_secret: Option<String>,
        /// Ageing: a pending task's priority rises by one for every this many seconds it
        /// waits (up to the highest priority pending), so low priorities are not starved.
        #[arg(long, default_value_t = 60)]
        ageing_secs: u64,
        /// Seconds a task waits for a worker that holds its model before another worker may
        /// evict a model to take it.
        #[arg(long, default_value_t = 30)]
        spread_after_secs: u64,
    },
    /// Run a worker: render tasks from the queue and upload the images.
    Worker(WorkerArgs),
    /// A coordinator and N workers in one process, for a laptop.
    Dev {
        #[command(flatten)]
        addrs: ServeAddrs,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Kill workers, Redis and the coordinator while a job runs; check nothing was lost.
    Chaos(chaos::ChaosArgs),
    /// Benchmarks: orchestration throughput, one SD 1.5 UNet evaluation, batch sizes.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Run `dev`, render the walkthrough's four prompts and write them with a grid.
    Demo(demo::DemoArgs),
    /// Submit a job.
    Submit(client::SubmitArgs),
    /// Show a job.
    Status {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends.
    Watch { job: String },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        json: bool,
        /// Only jobs in this state: pending, running, succeeded, failed, cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job: its unfinished tasks stop within one denoising step.
    Cancel { job: String },
    /// Download a job's images.
    Fetch {
        job: String,
        #[arg(long)]
        out: PathBuf,
        /// Also write grid.png (one row per prompt, one column per seed).
        #[arg(long)]
        grid: bool,
    },
    /// List workers.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Create the database if needed and apply migrations.
    Migrate,
    /// API tokens (needs FARM_DATABASE_URL).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Tenants' fair-share weights (needs FARM_DATABASE_URL).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Render locally in this process (no services): txt2img, img2img, inpaint, reconstruct.
    Generate(local::GenerateArgs),
    /// Write a prompt's token ids and text embeddings to a safetensors file.
    Embed(local::EmbedArgs),
    /// Fine-tune a model's UNet locally on images with captions.
    Train(train::TrainArgs),
    /// Model folders.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Worker name (default: hostname-pid-random).
    #[arg(long, env = "FARM_WORKER_ID")]
    pub id: Option<String>,
    /// sd (Stable Diffusion) or null (benchmark-only: no model, a tiny fixed PNG per task).
    #[arg(long, default_value = "sd")]
    pub pipeline: farm_worker::Pipeline,
    /// Render up to this many compatible tasks (same model, size, steps, scheduler,
    /// guidance, mode, strength) as one batch.
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// Keep at most this much model weight loaded, e.g. 8GiB, counted in the dtype the
    /// worker computes in (SD 1.5 in f16: about 2 GiB); least recently used models are
    /// evicted. Default: no limit.
    #[arg(long, value_parser = parse_bytes)]
    pub model_cache_bytes: Option<u64>,
    /// Take no image larger than this many pixels (width x height), e.g. 262144 for 512x512.
    #[arg(long)]
    pub max_pixels: Option<u64>,
    /// Accelerator memory, e.g. 24GiB: models larger than this are not routed here.
    #[arg(long, value_parser = parse_bytes)]
    pub device_memory: Option<u64>,
    /// Modes this worker runs, comma-separated (txt2img,img2img,inpaint,reconstruct,finetune);
    /// default: all.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub modes: Vec<farm_core::Mode>,
}

impl Default for WorkerArgs {
    fn default() -> Self {
        WorkerArgs {
            concurrency: 1,
            device: "cpu".into(),
            id: None,
            pipeline: farm_worker::Pipeline::Sd,
            max_batch: 1,
            model_cache_bytes: None,
            max_pixels: None,
            device_memory: None,
            modes: Vec::new(),
        }
    }
}

/// `8GiB`, `512MB`, `1048576`: a byte count.
fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (e.g. 8GiB, 512MB or a number of bytes): {e}"))
}

fn parse_mode(s: &str) -> Result<farm_core::Mode, String> {
    farm_core::Mode::ALL
        .iter()
        .copied()
        .find(|m| m.as_str() == s.trim())
        .ok_or_else(|| {
            let names: Vec<&str> = farm_core::Mode::ALL.iter().map(|m| m.as_str()).collect();
            format!("unknown mode {s:?}; use one of {}", names.join(", "))
        })
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token for a tenant and print it (it is shown only this once).
    Create {
        #[arg(long)]
        tenant: String,
        /// May see every tenant's jobs and the cluster.
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Set a tenant's fair-share weight: weight 2 gets two tasks dispatched for every one of
    /// a weight-1 tenant (everyone's default).
    Weight {
        #[arg(long)]
        tenant: String,
        /// Above 0, at most 1000 (a negative value gets the same clear refusal).
        #[arg(long, allow_negative_numbers = true)]
        weight: f64,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a tiny random-weight model with the real SD 1.x architecture (diffusers layout).
    InitTiny {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Download a diffusers-layout model (safetensors only) into FARM_MODELS.
    Pull {
        /// e.g. stable-diffusion-v1-5/stable-diffusion-v1-5
        repo: String,
        #[arg(long)]
        revision: Option<String>,
    },
}

/// Logs to stderr (text or JSON lines) and, with an OTLP endpoint, exports every span (each
/// job's and task's carry their ids) over OTLP/HTTP. Returns the exporter to flush at exit.
fn init_logging(
    format: &str,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::prelude::*;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower=warn,h2=warn")
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // RUST_LOG filters what is printed; exported spans keep their own level (info), so a
    // quiet terminal does not mean empty traces.
    let fmt = if format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let provider = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("farm")
                .build();
            Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("farm"))
            .with_filter(tracing_subscriber::EnvFilter::new(
                "info,sqlx=warn,tower=warn,h2=warn",
            ))
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(provider)
}

impl Settings {
    pub fn coordinator_config(&self, addrs: &ServeAddrs) -> CoordinatorConfig {
        let mut config = CoordinatorConfig::new(&self.database_url, &self.redis_url, &self.storage);
        config.redis_prefix = self.redis_prefix.clone();
        config.redis_ca = self.redis_ca.clone();
        config.grpc_addr = addrs.grpc_addr;
        config.http_addr = addrs.http_addr;
        config
    }

    pub fn worker_config(&self, args: &WorkerArgs) -> WorkerConfig {
        let mut config = WorkerConfig::new(&self.redis_url, &self.storage, self.models.clone());
        config.redis_prefix = self.redis_prefix.clone();
        config.redis_ca = self.redis_ca.clone();
        config.concurrency = args.concurrency;
        config.device = args.device.clone();
        config.pipeline = args.pipeline;
        config.max_batch = args.max_batch;
        config.model_cache_bytes = args.model_cache_bytes;
        config.capabilities = farm_core::Capabilities {
            max_pixels: args.max_pixels,
            device_memory: args.device_memory,
            modes: args.modes.clone(),
        };
        if let Some(id) = &args.id {
            config.id = WorkerId(id.clone());
        }
        config
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

fn write_token_file(token: &str) -> anyhow::Result<()> {
    let path = std::path::Path::new(client::TOKEN_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, format!("{token}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Coordinator and workers in one process until `shutdown`.
pub async fn run_dev(
    settings: &Settings,
    addrs: &ServeAddrs,
    workers: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, String, tokio::task::JoinSet<anyhow::Result<()>>)> {
    let bound = farm_coordinator::bind(settings.coordinator_config(addrs)).await?;
    let grpc = bound.grpc_addr();
    // A local admin token, where client commands find it without FARM_TOKEN.
    let token = bound.store().create_token("local", true).await?;
    write_token_file(&token)?;
    let mut set = tokio::task::JoinSet::new();
    set.spawn(bound.run(shutdown.clone()));
    for _ in 0..workers {
        let config = settings.worker_config(&WorkerArgs::default());
        set.spawn(farm_worker::run(config, shutdown.clone()));
    }
    Ok((grpc, token, set))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings;
    match cli.command {
        Command::Coordinator {
            addrs,
            id,
            queue_lease_secs,
            run_lease_secs,
            tls_cert,
            tls_key,
            webhook_secret,
            ageing_secs,
            spread_after_secs,
        } => {
            let mut config = settings.coordinator_config(&addrs);
            config.id = id;
            config.queue_lease = Duration::from_secs(queue_lease_secs.max(1));
            config.run_lease = Duration::from_secs(run_lease_secs.max(1));
            config.tls = tls_cert.zip(tls_key);
            config.webhook_secret = webhook_secret.filter(|s| !s.is_empty());
            config.ageing = Duration::from_secs(ageing_secs.max(1));
            config.spread_after = Duration::from_secs(spread_after_secs);
            farm_coordinator::run(config, shutdown_on_signal()).await
        }
        Command::Worker(args) => {
            farm_worker::run(settings.worker_config(&args), shutdown_on_signal()).await
        }
        Command::Dev { addrs, workers } => {
            let shutdown = shutdown_on_signal();
            let (grpc, _token, mut set) =
                run_dev(&settings, &addrs, workers, shutdown.clone()).await?;
            eprintln!(
                "farm dev: coordinator on http://{grpc}, {workers} worker(s); admin token in {}; Ctrl-C stops",
                client::TOKEN_FILE
            );
            while let Some(done) = set.join_next().await {
                done.context("a farm task panicked")??;
                shutdown.cancel();
            }
            Ok(())
        }
        Command::Demo(args) => demo::run(&settings, args).await,
        Command::Chaos(args) => chaos::run(&settings, args).await,
        Command::Bench { command } => bench::run(&settings, command).await,
        Command::Submit(args) => client::submit(&settings, args).await,
        Command::Status { job, json } => client::status(&settings, &job, json).await,
        Command::Watch { job } => client::watch_cmd(&settings, &job).await,
        Command::List {
            json,
            status,
            limit,
        } => client::list(&settings, json, status.as_deref(), limit).await,
        Command::Cancel { job } => client::cancel(&settings, &job).await,
        Command::Fetch { job, out, grid } => client::fetch(&settings, &job, &out, grid).await,
        Command::Workers { json } => client::workers(&settings, json).await,
        Command::Migrate => {
            farm_coordinator::connect_store(&settings.database_url).await?;
            println!(
                "migrations applied to {}",
                farm_core::redact_url(&settings.database_url)
            );
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { tenant, admin },
        } => {
            let tenant = tenant.trim();
            anyhow::ensure!(
                !tenant.is_empty() && tenant.len() <= 128,
                "--tenant must be 1 to 128 characters"
            );
            let store = farm_coordinator::connect_store(&settings.database_url).await?;
            println!("{}", store.create_token(tenant, admin).await?);
            Ok(())
        }
        Command::Tenant {
            command: TenantCommand::Weight { tenant, weight },
        } => {
            anyhow::ensure!(
                weight.is_finite() && weight > 0.0 && weight <= 1000.0,
                "--weight must be a number above 0 and at most 1000, got {weight}"
            );
            let store = farm_coordinator::connect_store(&settings.database_url).await?;
            store.set_tenant_weight(tenant.trim(), weight).await?;
            println!(
                "tenant {:?} now has fair-share weight {weight}",
                tenant.trim()
            );
            Ok(())
        }
        Command::Generate(args) => local::generate(args, settings.models.clone()).await,
        Command::Embed(args) => local::embed(args, settings.models.clone()).await,
        Command::Train(args) => train::run(args, settings.models.clone()).await,
        Command::Model {
            command: ModelCommand::Pull { repo, revision },
        } => local::pull(repo, revision, settings.models.clone()).await,
        Command::Model {
            command: ModelCommand::InitTiny { dir, seed },
        } => {
            farm_diffusion::init_tiny(&dir, seed)
                .with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
            println!(
                "wrote a tiny random-weight SD 1.x model to {}",
                dir.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tracer = match init_logging(
        &cli.settings.log_format,
        cli.settings.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    drop(runtime);
    if let Some(tracer) = tracer {
        // Flush the spans still batched.
        let _ = tracer.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
