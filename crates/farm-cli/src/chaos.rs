//! `farm chaos`: a whole farm of real processes under fire. Worker processes are SIGKILLed and
//! restarted every few seconds, Redis is restarted empty once and the coordinator is killed
//! and restarted once, while a job on the tiny model runs; then every task is checked.
//!
//! It uses the Postgres server of FARM_DATABASE_URL (a fresh database), its own
//! `redis-server` on a free port and a local storage folder, so it disturbs nothing else.

use std::collections::{HashMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use farm_proto::v1 as pb;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::jobs_client;
use crate::output::{job_status_name, task_status_name};
use crate::Settings;

#[derive(Args, Clone, Debug)]
pub struct ChaosArgs {
    /// Images in the job.
    #[arg(long, default_value_t = 300)]
    pub tasks: u32,
    /// Seconds of chaos (kills and restarts); the job then runs to the end.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Seconds between worker kills.
    #[arg(long, default_value_t = 3.0)]
    pub kill_every: f64,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 2)]
    pub steps: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Append the report as a row to this Markdown file (e.g. RELIABILITY.md).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub tasks: u32,
    pub workers: usize,
    pub chaos_s: u64,
    pub wall_s: f64,
    pub worker_kills: u32,
    pub redis_restarts: u32,
    pub coordinator_restarts: u32,
    pub succeeded: u32,
    /// Tasks not succeeded at the end, or whose object is missing or differs from Postgres.
    pub lost: u32,
    /// Objects beyond one per task.
    pub duplicated: u32,
    pub attempts_total: u64,
    pub tasks_retried: u32,
    /// From a worker's kill to the success of each task it was running.
    pub recovery_p50_ms: u64,
    pub recovery_p99_ms: u64,
    pub recovered_tasks: usize,
}

/// A child process, SIGKILLed on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn wait_for_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not open port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A farm of child processes (shared with `farm bench orchestration`).
pub(crate) struct Farm {
    pub(crate) exe: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) grpc_port: u16,
    pub(crate) redis_port: u16,
    pub(crate) coordinator: Option<Proc>,
    pub(crate) redis: Option<Proc>,
    pub(crate) workers: HashMap<usize, (String, Proc)>,
    pub(crate) generation: u32,
}

impl Farm {
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null());
        // FARM_CHILD_LOG=debug (any RUST_LOG filter) shows the children's logs, for
        // looking into a run; by default they keep quiet.
        match std::env::var("FARM_CHILD_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter).stderr(Stdio::inherit()),
            Err(_) => cmd.env("RUST_LOG", "error").stderr(Stdio::null()),
        };
        cmd
    }

    pub(crate) fn start_redis(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.redis_port.to_string(),
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start redis-server (is it installed?)")?;
        self.redis = Some(Proc(child));
        wait_for_port(self.redis_port, "redis-server")
    }

    pub(crate) fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let child = self
            .command()
            .args([
                "coordinator",
                "--grpc-addr",
                &format!("127.0.0.1:{}", self.grpc_port),
            ])
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--run-lease-secs",
                "5",
                "--queue-lease-secs",
                "15",
            ])
            .spawn()
            .context("cannot start the coordinator")?;
        self.coordinator = Some(Proc(child));
        wait_for_port(self.grpc_port, "coordinator")
    }

    fn start_worker(&mut self, slot: usize) -> anyhow::Result<()> {
        self.generation += 1;
        let id = format!("chaos-w{slot}-{}", self.generation);
        let child = self
            .command()
            .args(["worker", "--concurrency", "1", "--id", &id])
            .spawn()
            .context("cannot start a worker")?;
        self.workers.insert(slot, (id, Proc(child)));
        Ok(())
    }
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn run(settings: &Settings, args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tasks >= 1, "--tasks must be at least 1");
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(args.kill_every > 0.0, "--kill-every must be positive");
    let started = Instant::now();
    let scratch = tempfile_dir()?;
    let models = scratch.join("models");
    farm_diffusion::init_tiny(&models.join("tiny"), 0).context("cannot write the tiny model")?;
    let storage = scratch.join("objects");
    let name = format!(
        "farm_chaos_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let (server, _) = settings
        .database_url
        .rsplit_once('/')
        .context("FARM_DATABASE_URL has no database name")?;
    let database_url = format!("{server}/{name}");
    let redis_port = free_port()?;
    let prefix = "chaos";
    let env = vec![
        ("FARM_DATABASE_URL".to_string(), database_url.clone()),
        (
            "FARM_REDIS_URL".to_string(),
            format!("redis://127.0.0.1:{redis_port}"),
        ),
        ("FARM_REDIS_PREFIX".to_string(), prefix.to_string()),
        ("FARM_STORAGE".to_string(), storage.display().to_string()),
        ("FARM_MODELS".to_string(), models.display().to_string()),
    ];
    let mut farm = Farm {
        exe: std::env::current_exe().context("cannot find the farm binary")?,
        env,
        grpc_port: free_port()?,
        redis_port,
        coordinator: None,
        redis: None,
        workers: HashMap::new(),
        generation: 0,
    };
    farm.start_redis()?;
    let store = farm_coordinator::connect_store(&database_url).await?;
    let token = store.create_token("chaos", true).await?;
    drop(store);
    farm.start_coordinator()?;
    for slot in 0..args.workers {
        farm.start_worker(slot)?;
    }

    let mut client_settings = settings.clone();
    client_settings.coordinator = format!("http://127.0.0.1:{}", farm.grpc_port);
    client_settings.token = Some(token);
    let mut client = jobs_client(&client_settings).await?;
    let prompts = [
        "an astronaut riding a horse",
        "an avocado armchair",
        "a white dog",
        "an otter",
    ];
    let per_prompt = args.tasks.div_ceil(prompts.len() as u32);
    let n_prompts = args.tasks.div_ceil(per_prompt);
    let spec = pb::JobSpec {
        model: "tiny".into(),
        prompts: prompts
            .iter()
            .take(n_prompts as usize)
            .map(|p| p.to_string())
            .collect(),
        seed_range: Some(pb::SeedRange {
            start: 1,
            count: per_prompt,
        }),
        width: 64,
        height: 64,
        steps: args.steps,
        max_attempts: 10,
        ..Default::default()
    };
    let job = crate::client::submit_job(&mut client, spec, "")
        .await?
        .job
        .context("no job")?;
    let job_id = job.id.clone();
    eprintln!(
        "chaos: job {job_id} with {} tasks, {} workers, {}s of chaos",
        job.tasks_total, args.workers, args.duration
    );

    let chaos_until = Instant::now() + Duration::from_secs(args.duration);
    let redis_at = Instant::now() + Duration::from_secs(args.duration / 3);
    let coordinator_at = Instant::now() + Duration::from_secs(args.duration * 2 / 3);
    let deadline = chaos_until + Duration::from_secs(300);
    let mut next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every);
    let (mut kills, mut redis_restarts, mut coordinator_restarts) = (0u32, 0u32, 0u32);
    // Tasks running on a worker when it was killed, with the kill time.
    let mut orphaned: HashMap<u32, i64> = HashMap::new();
    let mut last: Option<pb::Job> = None;
    let mut victim = 0usize;
    loop {
        if let Ok(snapshot) = client
            .get_job(pb::GetJobRequest {
                job_id: job_id.clone(),
                include_tasks: true,
            })
            .await
        {
            let snapshot = snapshot.into_inner();
            if crate::output::is_terminal(snapshot.status) {
                last = Some(snapshot);
                if Instant::now() >= chaos_until {
                    break;
                }
            } else {
                last = Some(snapshot);
            }
        }
        let now = Instant::now();
        if now > deadline {
            bail!("chaos: job {job_id} did not finish within 300 s after the chaos");
        }
        if now < chaos_until && now >= next_kill {
            let slot = victim % args.workers;
            victim += 1;
            if let Some((id, proc)) = farm.workers.remove(&slot) {
                drop(proc);
                kills += 1;
                let at = now_ms();
                for t in last.iter().flat_map(|j| j.tasks.iter()) {
                    if t.worker == id && task_status_name(t.status) == "running" {
                        orphaned.entry(t.index).or_insert(at);
                    }
                }
            }
            farm.start_worker(slot)?;
            next_kill = now + Duration::from_secs_f64(args.kill_every);
        }
        if redis_restarts == 0 && now >= redis_at {
            farm.redis = None;
            farm.start_redis()?;
            redis_restarts += 1;
            eprintln!("chaos: Redis restarted empty");
        }
        if coordinator_restarts == 0 && now >= coordinator_at {
            farm.coordinator = None;
            tokio::time::sleep(Duration::from_millis(500)).await;
            farm.start_coordinator()?;
            coordinator_restarts += 1;
            eprintln!("chaos: coordinator killed and restarted");
            client = jobs_client(&client_settings).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = last.context("never saw the job")?;
    farm.workers.clear();
    farm.coordinator = None;

    let report = verify(
        &job,
        &storage,
        prefix,
        &orphaned,
        args.clone(),
        started,
        (kills, redis_restarts, coordinator_restarts),
    )?;
    drop(farm);
    if let Err(e) = farm_coordinator::drop_database(&database_url).await {
        tracing::warn!(error = %e, "could not drop the chaos database");
    }
    let _ = std::fs::remove_dir_all(&scratch);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report:#?}");
    }
    if let Some(path) = &args.report {
        append_report(path, &report)?;
    }
    if report.lost > 0 || report.duplicated > 0 || job_status_name(job.status) != "succeeded" {
        bail!(
            "chaos: {} lost, {} duplicated, job {}",
            report.lost,
            report.duplicated,
            job_status_name(job.status)
        );
    }
    Ok(())
}

fn verify(
    job: &pb::Job,
    storage: &Path,
    prefix: &str,
    orphaned: &HashMap<u32, i64>,
    args: ChaosArgs,
    started: Instant,
    (worker_kills, redis_restarts, coordinator_restarts): (u32, u32, u32),
) -> anyhow::Result<ChaosReport> {
    let dir = storage.join(prefix).join("jobs").join(&job.id);
    let files: HashSet<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut lost = 0;
    let mut succeeded = 0;
    let mut recoveries = Vec::new();
    for task in &job.tasks {
        if task_status_name(task.status) != "succeeded" {
            lost += 1;
            continue;
        }
        let file = storage.join(&task.object_key);
        let intact = std::fs::read(&file)
            .map(|bytes| hex::encode(Sha256::digest(&bytes)) == task.sha256)
            .unwrap_or(false);
        if !intact {
            lost += 1;
            continue;
        }
        succeeded += 1;
        if let Some(killed_at) = orphaned.get(&task.index) {
            recoveries.push((task.finished_at_ms - killed_at).max(0) as u64);
        }
    }
    recoveries.sort_unstable();
    let attempts_total: u64 = job.tasks.iter().map(|t| u64::from(t.attempts)).sum();
    Ok(ChaosReport {
        tasks: job.tasks_total,
        workers: args.workers,
        chaos_s: args.duration,
        wall_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        worker_kills,
        redis_restarts,
        coordinator_restarts,
        succeeded,
        lost,
        duplicated: (files.len() as u32).saturating_sub(job.tasks_total),
        attempts_total,
        tasks_retried: job.tasks.iter().filter(|t| t.attempts > 1).count() as u32,
        recovery_p50_ms: percentile(&recoveries, 50.0),
        recovery_p99_ms: percentile(&recoveries, 99.0),
        recovered_tasks: recoveries.len(),
    })
}

fn append_report(path: &Path, r: &ChaosReport) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(
        file,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.tasks,
        r.workers,
        r.chaos_s,
        r.wall_s,
        r.worker_kills,
        r.redis_restarts,
        r.coordinator_restarts,
        r.lost,
        r.duplicated,
        r.tasks_retried,
        r.recovery_p50_ms,
        r.recovery_p99_ms
    )?;
    Ok(())
}

pub(crate) fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("farm-chaos-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
