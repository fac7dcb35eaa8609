//! Client commands: they talk to a coordinator over gRPC only.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use farm_proto::v1 as pb;
use farm_proto::v1::cluster_service_client::ClusterServiceClient;
use farm_proto::v1::job_service_client::JobServiceClient;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::output::{is_terminal, job_json, job_status_name, print_job, print_table};
use crate::Settings;

const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where `farm dev` and `farm demo` leave their local admin token, and where the CLI looks
/// when FARM_TOKEN is unset.
pub const TOKEN_FILE: &str = "./farm-data/token";

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Jobs = JobServiceClient<InterceptedService<Channel, Auth>>;
pub type Cluster = ClusterServiceClient<InterceptedService<Channel, Auth>>;

/// FARM_TOKEN, else the token `farm dev`/`farm demo` wrote, else none.
fn auth(settings: &Settings) -> anyhow::Result<Auth> {
    let token = match &settings.token {
        Some(t) => Some(t.trim().to_string()),
        None => std::fs::read_to_string(TOKEN_FILE)
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let value = token
        .filter(|t| !t.is_empty())
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .context("FARM_TOKEN holds characters a token cannot have")
        })
        .transpose()?;
    Ok(Auth(value))
}

#[derive(Args, Clone, Debug, Default)]
pub struct SubmitArgs {
    /// txt2img, img2img, inpaint or reconstruct.
    #[arg(long, default_value = "txt2img")]
    pub mode: String,
    /// img2img, inpaint, reconstruct: the image to start from (PNG or JPEG); it is uploaded
    /// with the job. Width and height default to its size.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// inpaint: white = repaint, black = keep.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// img2img and inpaint: how much of the schedule to run, in [0, 1] (default 0.8).
    #[arg(long)]
    pub strength: Option<f64>,
    /// A model folder whose VAE replaces the model's own.
    #[arg(long, default_value = "")]
    pub vae: String,
    /// finetune: the dataset, a local folder (uploaded with the job: images with same-named
    /// .txt captions, or metadata.jsonl) or `storage:PREFIX` already in the farm's storage.
    #[arg(long)]
    pub data: Option<String>,
    /// finetune: the name the trained model is published under.
    #[arg(long, default_value = "")]
    pub output_model: String,
    /// finetune: images per training step (default 1).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub batch_size: u32,
    /// finetune: AdamW learning rate (default 1e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// finetune: square training size, a multiple of 8 (default: the model's).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub resolution: u32,
    /// finetune: checkpoint every K steps (default: a tenth of the steps).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub checkpoint_every: u32,
    /// Images per prompt (the same as --count: seeds SEED..SEED+N-1).
    #[arg(long, conflicts_with_all = ["seeds", "count"])]
    pub num_images: Option<u32>,
    /// A prompt (repeatable): one image per prompt and seed.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// A file with one prompt per line (blank lines skipped).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// First seed; seeds are SEED..SEED+COUNT-1 (random when not given).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1, conflicts_with = "seeds")]
    pub count: u32,
    /// An explicit list of seeds, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Multiple of 8 in [64, 2048] (default 512).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub width: u32,
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub height: u32,
    /// Denoising steps in [1, 1000] (default 50).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub steps: u32,
    /// Classifier-free guidance scale in [0, 50] (default 7.5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// pndm, ddim, dpm++ or euler-a (default pndm).
    #[arg(long, default_value = "")]
    pub scheduler: String,
    /// A model folder name under the workers' FARM_MODELS.
    #[arg(long, env = "FARM_MODEL", default_value = "tiny")]
    pub model: String,
    /// Higher runs first: low, normal, high, urgent (-10, 0, 10, 50) or an integer in
    /// [-100, 100]. Waiting tasks gain a level per the coordinator's --ageing-secs.
    #[arg(long, default_value = "normal", allow_negative_numbers = true, value_parser = farm_core::parse_priority)]
    pub priority: i32,
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub max_attempts: u32,
    /// A retried submit with the same key returns the same job.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// POST the job as JSON to this http(s) URL when it ends (signed with the coordinator's
    /// --webhook-secret).
    #[arg(long, default_value = "")]
    pub webhook_url: String,
    /// Block until the job ends (a progress bar on a terminal).
    #[arg(long)]
    pub wait: bool,
    /// Print the job as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// `INVALID_ARGUMENT: width: ...` style messages for a failed RPC.
fn rpc_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => {
            return anyhow::anyhow!(
                "{what}: unauthenticated: {}; set FARM_TOKEN to a token from `farm token create --tenant NAME`",
                status.message()
            )
        }
        _ => "error",
    };
    anyhow::anyhow!("{what}: {code}: {}", status.message())
}

async fn channel(settings: &Settings) -> anyhow::Result<Channel> {
    let url = &settings.coordinator;
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| {
            format!("FARM_COORDINATOR {url:?} is not a URL like http://127.0.0.1:50051")
        })?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &settings.tls_ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("FARM_TLS_CA {}: cannot read it", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint
            .tls_config(tls)
            .context("cannot set up TLS for FARM_COORDINATOR")?
    } else {
        endpoint
    };
    endpoint.connect().await.with_context(|| {
        format!("cannot reach the coordinator at {url}; start one with `farm coordinator` (or `farm dev`), or set FARM_COORDINATOR")
    })
}

pub async fn jobs_client(settings: &Settings) -> anyhow::Result<Jobs> {
    Ok(
        JobServiceClient::with_interceptor(channel(settings).await?, auth(settings)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

fn read_prompts(args: &SubmitArgs) -> anyhow::Result<Vec<String>> {
    let mut prompts = args.prompts.clone();
    if args.mode == "finetune" {
        return Ok(prompts);
    }
    if let Some(path) = &args.prompts_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--prompts-file {}: cannot read it", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE");
    }
    Ok(prompts)
}

pub fn job_spec(args: &SubmitArgs) -> anyhow::Result<pb::JobSpec> {
    let (seeds, seed_range) = if args.seeds.is_empty() {
        let start = args.seed.unwrap_or_else(|| u64::from(rand_seed()));
        (
            Vec::new(),
            Some(pb::SeedRange {
                start,
                count: args.num_images.unwrap_or(args.count),
            }),
        )
    } else {
        (args.seeds.clone(), None)
    };
    Ok(pb::JobSpec {
        mode: args.mode.clone(),
        strength: args.strength,
        vae: args.vae.clone(),
        model: args.model.clone(),
        prompts: read_prompts(args)?,
        negative_prompt: args.negative_prompt.clone(),
        seeds,
        seed_range,
        width: args.width,
        height: args.height,
        steps: if args.mode == "finetune" {
            0
        } else {
            args.steps
        },
        guidance_scale: args.guidance,
        scheduler: args.scheduler.clone(),
        priority: args.priority,
        max_attempts: args.max_attempts,
        webhook_url: args.webhook_url.clone(),
        output_model: args.output_model.clone(),
        train_steps: if args.mode == "finetune" {
            args.steps
        } else {
            0
        },
        batch_size: args.batch_size,
        learning_rate: args.lr,
        resolution: args.resolution,
        checkpoint_every: args.checkpoint_every,
        dataset: match args
            .data
            .as_deref()
            .and_then(|d| d.strip_prefix("storage:"))
        {
            Some(prefix) => prefix.to_string(),
            None => String::new(),
        },
        ..Default::default()
    })
}

/// The files of a local dataset folder (not recursive), to upload with a finetune job.
fn dataset_files(args: &SubmitArgs) -> anyhow::Result<Vec<pb::DatasetFile>> {
    let Some(dir) = args.data.as_deref().filter(|d| !d.starts_with("storage:")) else {
        return Ok(Vec::new());
    };
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("--data {dir}: not a folder (or use storage:PREFIX for a dataset in storage)")
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("--data {dir}: cannot list it"))?
            .path();
        if !path.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = std::fs::read(&path)
            .with_context(|| format!("--data: cannot read {}", path.display()))?;
        files.push(pb::DatasetFile { name, data });
    }
    if files.is_empty() {
        bail!(
            "--data {dir}: the folder has no files; put images with same-named .txt captions there"
        );
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    nanos ^ std::process::id().rotate_left(16)
}

fn read_input(flag: &str, path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        None => Ok(Vec::new()),
        Some(p) => {
            std::fs::read(p).with_context(|| format!("{flag} {}: cannot read it", p.display()))
        }
    }
}

pub async fn submit_job(
    client: &mut Jobs,
    spec: pb::JobSpec,
    idempotency_key: &str,
) -> anyhow::Result<pb::SubmitJobResponse> {
    submit_request(
        client,
        pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: idempotency_key.to_string(),
            ..Default::default()
        },
    )
    .await
}

pub async fn submit_request(
    client: &mut Jobs,
    request: pb::SubmitJobRequest,
) -> anyhow::Result<pb::SubmitJobResponse> {
    let response = client
        .submit_job(request)
        .await
        .map_err(|s| rpc_error("submit", s))?;
    Ok(response.into_inner())
}

pub async fn submit(settings: &Settings, args: SubmitArgs) -> anyhow::Result<()> {
    let request = pb::SubmitJobRequest {
        spec: Some(job_spec(&args)?),
        idempotency_key: args.idempotency_key.clone(),
        init_image: read_input("--init-image", args.init_image.as_deref())?,
        mask: read_input("--mask", args.mask.as_deref())?,
        dataset_files: dataset_files(&args)?,
    };
    let mut client = jobs_client(settings).await?;
    let response = submit_request(&mut client, request).await?;
    let job = response.job.context("coordinator answered without a job")?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
        } else {
            println!("{}", job.id);
        }
        return Ok(());
    }
    if !args.json {
        eprintln!("job {} submitted: {} images", job.id, job.tasks_total);
    }
    let job = watch_job(&mut client, &job.id, true).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
    } else {
        println!("{}", job.id);
    }
    ensure_succeeded(&job)
}

fn ensure_succeeded(job: &pb::Job) -> anyhow::Result<()> {
    match job_status_name(job.status) {
        "succeeded" => Ok(()),
        other => bail!(
            "job {} {other}: {} of {} images succeeded, {} failed, {} cancelled",
            job.id,
            job.tasks_succeeded,
            job.tasks_total,
            job.tasks_failed,
            job.tasks_cancelled
        ),
    }
}

async fn get_job(client: &mut Jobs, job: &str, include_tasks: bool) -> anyhow::Result<pb::Job> {
    Ok(client
        .get_job(pb::GetJobRequest {
            job_id: job.to_string(),
            include_tasks,
        })
        .await
        .map_err(|s| rpc_error("status", s))?
        .into_inner())
}

pub async fn status(settings: &Settings, job: &str, json: bool) -> anyhow::Result<()> {
    let mut client = jobs_client(settings).await?;
    let job = get_job(&mut client, job, true).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
    } else {
        print_job(&job);
    }
    Ok(())
}

/// Follows a job until it ends (reconnecting if the coordinator restarts) and returns it with
/// its tasks. Shows a progress bar on a terminal, plain lines otherwise.
pub async fn watch_job(client: &mut Jobs, job_id: &str, show: bool) -> anyhow::Result<pb::Job> {
    let tty = std::io::stderr().is_terminal();
    let bar = if show && tty {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let mut last_line = String::new();
    let mut steps: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    let mut failures = 0;
    loop {
        let stream = client
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.to_string(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && failures < 60 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(s) => return Err(rpc_error("watch", s)),
        };
        let mut tasks: BTreeMap<u32, pb::Task> = BTreeMap::new();
        let mut total = 0u32;
        loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) if failures < 60 => {
                    failures += 1;
                    tracing::debug!(error = %s, "watch stream broke; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                Err(s) => return Err(rpc_error("watch", s)),
            };
            match message.event {
                Some(pb::job_event::Event::Snapshot(job)) => {
                    total = job.tasks_total;
                    tasks = job.tasks.iter().map(|t| (t.index, t.clone())).collect();
                    if is_terminal(job.status) {
                        if let Some(bar) = &bar {
                            bar.set_length(u64::from(total));
                            bar.set_position(u64::from(
                                job.tasks_succeeded + job.tasks_failed + job.tasks_cancelled,
                            ));
                            bar.finish_with_message(job_status_name(job.status));
                        } else if show {
                            eprintln!("job {} {}", job.id, job_status_name(job.status));
                        }
                        return Ok(job);
                    }
                }
                Some(pb::job_event::Event::Task(task)) => {
                    steps.remove(&task.index);
                    tasks.insert(task.index, task);
                }
                Some(pb::job_event::Event::Progress(p)) => {
                    steps.insert(p.index, (p.step, p.total_steps));
                }
                None => {}
            }
            let done = tasks
                .values()
                .filter(|t| {
                    matches!(
                        crate::output::task_status_name(t.status),
                        "succeeded" | "failed" | "cancelled"
                    )
                })
                .count() as u64;
            let running: Vec<String> = steps
                .iter()
                .take(4)
                .map(|(i, (s, n))| format!("#{i} {s}/{n}"))
                .collect();
            if let Some(bar) = &bar {
                bar.set_length(u64::from(total));
                bar.set_position(done);
                bar.set_message(running.join(" "));
            } else if show {
                let line = format!("{done}/{total} images done");
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
            }
        }
    }
}

pub async fn watch_cmd(settings: &Settings, job: &str) -> anyhow::Result<()> {
    let mut client = jobs_client(settings).await?;
    let job = watch_job(&mut client, job, true).await?;
    print_job(&job);
    Ok(())
}

pub async fn list(
    settings: &Settings,
    json: bool,
    status: Option<&str>,
    limit: u32,
) -> anyhow::Result<()> {
    let status = match status {
        None => pb::JobStatus::Unspecified,
        Some("pending") => pb::JobStatus::Pending,
        Some("running") => pb::JobStatus::Running,
        Some("succeeded") => pb::JobStatus::Succeeded,
        Some("failed") => pb::JobStatus::Failed,
        Some("cancelled") => pb::JobStatus::Cancelled,
        Some(other) => {
            bail!("--status {other:?}: expected pending, running, succeeded, failed or cancelled")
        }
    };
    let mut client = jobs_client(settings).await?;
    let jobs = client
        .list_jobs(pb::ListJobsRequest {
            page_size: limit.clamp(1, 1000),
            page_token: String::new(),
            status: status as i32,
        })
        .await
        .map_err(|s| rpc_error("list", s))?
        .into_inner()
        .jobs;
    if json {
        let all: Vec<_> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let spec = j.spec.clone().unwrap_or_default();
            vec![
                j.id.clone(),
                job_status_name(j.status).to_string(),
                format!("{}/{}", j.tasks_succeeded, j.tasks_total),
                j.tasks_failed.to_string(),
                spec.model,
                format!("{}x{}", spec.width, spec.height),
                spec.prompts
                    .first()
                    .cloned()
                    .unwrap_or_default()
                    .chars()
                    .take(40)
                    .collect(),
            ]
        })
        .collect();
    print_table(
        &[
            "JOB",
            "STATUS",
            "DONE",
            "FAILED",
            "MODEL",
            "SIZE",
            "FIRST PROMPT",
        ],
        &rows,
    );
    Ok(())
}

pub async fn cancel(settings: &Settings, job: &str) -> anyhow::Result<()> {
    let mut client = jobs_client(settings).await?;
    let job = client
        .cancel_job(pb::CancelJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(|s| rpc_error("cancel", s))?
        .into_inner();
    println!(
        "job {} {}: {} succeeded, {} cancelled",
        job.id,
        job_status_name(job.status),
        job.tasks_succeeded,
        job.tasks_cancelled
    );
    Ok(())
}

/// Downloads every succeeded image of a job into `out` as `{index:06}-{seed}.png`; returns
/// the paths in task order.
pub async fn download(
    client: &mut Jobs,
    job: &pb::Job,
    out: &Path,
) -> anyhow::Result<Vec<(pb::Task, PathBuf)>> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create it", out.display()))?;
    let mut written = Vec::new();
    for task in &job.tasks {
        if crate::output::task_status_name(task.status) != "succeeded" {
            continue;
        }
        let image = client
            .get_task_image(pb::GetTaskImageRequest {
                job_id: job.id.clone(),
                index: task.index,
            })
            .await
            .map_err(|s| rpc_error("fetch", s))?
            .into_inner();
        let path = out.join(format!("{:06}-{}.png", task.index, task.seed));
        let bytes = if image.url.is_empty() {
            image.png
        } else {
            fetch_url(&image.url)
                .await
                .with_context(|| format!("image {} of job {}", task.index, job.id))?
        };
        std::fs::write(&path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push((task.clone(), path));
    }
    Ok(written)
}

/// GETs a presigned URL (no credentials needed).
async fn fetch_url(url: &str) -> anyhow::Result<Vec<u8>> {
    let response = reqwest::get(url)
        .await
        .context("cannot download the image")?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "downloading the image answered {status}"
    );
    Ok(response
        .bytes()
        .await
        .context("cannot download the image")?
        .to_vec())
}

pub fn write_grid(paths: &[PathBuf], rows: u32, cols: u32, out: &Path) -> anyhow::Result<()> {
    let images = paths
        .iter()
        .map(|p| {
            image::open(p)
                .map(|i| i.to_rgb8())
                .with_context(|| format!("cannot read {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let grid = crate::grid::grid(&images, rows, cols)?;
    grid.save(out)
        .with_context(|| format!("cannot write {}", out.display()))
}

pub async fn fetch(settings: &Settings, job: &str, out: &Path, grid: bool) -> anyhow::Result<()> {
    let mut client = jobs_client(settings).await?;
    let job = get_job(&mut client, job, true).await?;
    let written = download(&mut client, &job, out).await?;
    println!(
        "wrote {} of {} images to {}",
        written.len(),
        job.tasks_total,
        out.display()
    );
    if grid {
        if written.len() as u32 != job.tasks_total {
            bail!(
                "--grid needs every image; {} of {} succeeded",
                written.len(),
                job.tasks_total
            );
        }
        let spec = job.spec.clone().unwrap_or_default();
        let seeds = (job.tasks_total as usize / spec.prompts.len().max(1)).max(1) as u32;
        let prompts = spec.prompts.len().max(1) as u32;
        let (rows, cols) = if seeds == 1 {
            (1, prompts)
        } else {
            (prompts, seeds)
        };
        let paths: Vec<PathBuf> = written.into_iter().map(|(_, p)| p).collect();
        let path = out.join("grid.png");
        write_grid(&paths, rows, cols, &path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

pub async fn workers(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let mut client: Cluster =
        ClusterServiceClient::with_interceptor(channel(settings).await?, auth(settings)?);
    let workers = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(|s| rpc_error("workers", s))?
        .into_inner()
        .workers;
    if json {
        let all: Vec<_> = workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id, "hostname": w.hostname, "device": w.device,
                    "concurrency": w.concurrency, "running": w.running, "models": w.models,
                    "online": w.online, "last_seen_ms": w.last_seen_ms,
                    "tasks_done": w.tasks_done, "tasks_failed": w.tasks_failed,
                    "max_batch": w.max_batch, "batches": w.batches,
                    "model_loads": w.model_loads, "model_evictions": w.model_evictions,
                    "cache_capacity_bytes": w.cache_capacity_bytes,
                    "cache_used_bytes": w.cache_used_bytes, "max_pixels": w.max_pixels,
                    "device_memory_bytes": w.device_memory_bytes, "modes": w.modes,
                    "draining": w.draining,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                match (w.online, w.draining) {
                    (true, false) => "online",
                    (true, true) => "draining",
                    (false, _) => "offline",
                }
                .to_string(),
                w.device.clone(),
                format!("{}/{}", w.running, w.concurrency),
                w.models.join(","),
                w.model_loads.to_string(),
                w.max_batch.to_string(),
                w.tasks_done.to_string(),
                w.tasks_failed.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "WORKER", "STATE", "DEVICE", "BUSY", "MODELS", "LOADS", "BATCH", "DONE", "FAILED",
        ],
        &rows,
    );
    Ok(())
}
