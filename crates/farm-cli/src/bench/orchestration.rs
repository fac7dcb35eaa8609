//! `farm bench orchestration`: a farm of real processes (its own `redis-server`, a fresh
//! Postgres database, local storage, a coordinator and W workers on the `null` pipeline, as
//! `farm chaos` builds it), one job of N tasks, and the raw Redis Streams round trip on the
//! same Redis as the ceiling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use farm_core::{Attempt, JobId, Mode, SchedulerName, TaskRef, TaskSpec, WorkerId};
use farm_proto::v1 as pb;
use farm_queue::Queue;
use serde::Serialize;

use super::round;
use crate::chaos::{free_port, Farm, Proc};
use crate::client::jobs_client;
use crate::Settings;

/// The model name the null workers advertise (an empty model folder).
const NULL_MODEL: &str = "null";
/// The dispatcher claims at most this many tasks per round, one pipelined XADD batch.
const DISPATCH_BATCH: u64 = 1000;

#[derive(Args, Clone, Debug)]
pub struct OrchestrationArgs {
    /// Tasks in the job.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Slots per worker (the dispatcher keeps about twice the slots queued or running).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Each worker's --max-batch: tasks taken per read and reported per round trip.
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// Single-task jobs submitted one at a time on the idle farm first, for the idle
    /// submit→start latency (0: none).
    #[arg(long, default_value_t = 20)]
    pub idle_probes: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct OrchestrationReport {
    pub tasks: u32,
    pub workers: usize,
    pub concurrency: usize,
    pub max_batch: usize,
    /// N / (last task's finished_at − the moment SubmitJob was sent).
    pub tasks_per_s: f64,
    /// N / time for N dispatch messages through XADD → XREADGROUP → XACK, same batching.
    pub raw_roundtrips_per_s: f64,
    /// tasks_per_s / raw_roundtrips_per_s.
    pub ratio: f64,
    /// Per task of the job: started_at (as recorded in Postgres) − the moment SubmitJob was
    /// sent. Includes the wait behind earlier tasks of the same job.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The same for single-task jobs on the idle farm.
    pub idle_p50_ms: f64,
    pub idle_p99_ms: f64,
    /// SubmitJob latency: validation and the job with its N tasks in one transaction.
    pub persist_ms: f64,
    pub wall_s: f64,
    pub succeeded: u32,
    pub objects: usize,
}

fn micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn job_spec(tasks: u32) -> pb::JobSpec {
    pb::JobSpec {
        model: NULL_MODEL.into(),
        prompts: vec!["a benchmark".into()],
        seed_range: Some(pb::SeedRange {
            start: 1,
            count: tasks,
        }),
        width: 64,
        height: 64,
        steps: 1,
        ..Default::default()
    }
}

pub async fn run(settings: &Settings, args: OrchestrationArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tasks >= 1, "--tasks must be at least 1");
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let started = Instant::now();
    let scratch =
        std::env::temp_dir().join(format!("farm-bench-{}", uuid::Uuid::new_v4().simple()));
    let models = scratch.join("models");
    std::fs::create_dir_all(models.join(NULL_MODEL))?;
    // Only so that workers advertise the model; the null pipeline never reads it.
    std::fs::write(models.join(NULL_MODEL).join("model_index.json"), "{}")?;
    let storage = scratch.join("objects");
    let name = format!(
        "farm_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let (server, _) = settings
        .database_url
        .rsplit_once('/')
        .context("FARM_DATABASE_URL has no database name")?;
    let database_url = format!("{server}/{name}");
    let redis_port = free_port()?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let prefix = "bench";
    let env = vec![
        ("FARM_DATABASE_URL".to_string(), database_url.clone()),
        ("FARM_REDIS_URL".to_string(), redis_url.clone()),
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
        workers: Default::default(),
        generation: 0,
    };
    let result = measure(&mut farm, settings, &args, &database_url, &redis_url).await;
    drop(farm);
    if let Err(e) = farm_coordinator::drop_database(&database_url).await {
        tracing::warn!(error = %e, "could not drop the bench database");
    }
    let objects = count_files(&storage.join(prefix));
    let _ = std::fs::remove_dir_all(&scratch);
    let mut report = result?;
    report.objects = objects;
    report.wall_s = round(started.elapsed().as_secs_f64(), 1);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "orchestration: {} tasks, {} workers x {} slots (null pipeline)\n\
             end to end:      {:.0} tasks/s\n\
             raw XADD->XREADGROUP->XACK: {:.0} round trips/s\n\
             ratio:           {:.3}\n\
             submit->start:   p50 {:.1} ms, p99 {:.1} ms (tasks of the job)\n\
             idle:            p50 {:.1} ms, p99 {:.1} ms (single-task jobs)\n\
             persist:         {:.0} ms for the {}-task job",
            report.tasks,
            report.workers,
            report.concurrency,
            report.tasks_per_s,
            report.raw_roundtrips_per_s,
            report.ratio,
            report.p50_ms,
            report.p99_ms,
            report.idle_p50_ms,
            report.idle_p99_ms,
            report.persist_ms,
            report.tasks
        );
    }
    if report.succeeded != report.tasks || report.objects < report.tasks as usize {
        bail!(
            "orchestration: {} of {} tasks succeeded, {} objects",
            report.succeeded,
            report.tasks,
            report.objects
        );
    }
    Ok(())
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path)
            } else {
                1
            }
        })
        .sum()
}

async fn measure(
    farm: &mut Farm,
    settings: &Settings,
    args: &OrchestrationArgs,
    database_url: &str,
    redis_url: &str,
) -> anyhow::Result<OrchestrationReport> {
    farm.start_redis()?;
    let store = farm_coordinator::connect_store(database_url).await?;
    let token = store.create_token("bench", true).await?;
    farm.start_coordinator()?;
    for slot in 0..args.workers {
        let id = format!("bench-w{slot}");
        let child = farm
            .command()
            .args(["worker", "--pipeline", "null", "--id", &id])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--max-batch", &args.max_batch.to_string()])
            .spawn()
            .context("cannot start a worker")?;
        farm.workers.insert(slot, (id, Proc(child)));
    }
    // Wait until the coordinator counts every worker's slots (first heartbeats applied).
    let slots = (args.workers * args.concurrency) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (online, _, _) = store.capacity().await?;
        if online >= slots {
            break;
        }
        if Instant::now() > deadline {
            bail!("workers did not come online: {online} of {slots} slots after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut client_settings = settings.clone();
    client_settings.coordinator = format!("http://127.0.0.1:{}", farm.grpc_port);
    client_settings.token = Some(token);
    let mut client = jobs_client(&client_settings).await?;

    // Idle latency: one single-task job at a time.
    let mut idle = Vec::new();
    for _ in 0..args.idle_probes {
        let sent = micros_now();
        let job = crate::client::submit_job(&mut client, job_spec(1), "")
            .await?
            .job
            .context("no job")?;
        let id = JobId(job.id.parse().context("job id")?);
        let rows = wait_job(&store, id, Duration::from_millis(2), 30).await?;
        if let Some(at) = rows.first().and_then(|t| t.started_at) {
            idle.push((at.timestamp_micros() - sent) as f64 / 1000.0);
        }
    }
    idle.sort_by(f64::total_cmp);

    // The job.
    let sent = micros_now();
    let submit_started = Instant::now();
    let job = crate::client::submit_job(&mut client, job_spec(args.tasks), "")
        .await?
        .job
        .context("no job")?;
    let persist_ms = submit_started.elapsed().as_secs_f64() * 1000.0;
    let id = JobId(job.id.parse().context("job id")?);
    let timeout = 120 + u64::from(args.tasks) / 50;
    let rows = wait_job(&store, id, Duration::from_millis(100), timeout).await?;
    let succeeded = rows
        .iter()
        .filter(|t| t.status == farm_core::TaskStatus::Succeeded)
        .count() as u32;
    let last_finish = rows
        .iter()
        .filter_map(|t| t.finished_at)
        .map(|t| t.timestamp_micros())
        .max()
        .unwrap_or(sent);
    let e2e_s = ((last_finish - sent) as f64 / 1e6).max(1e-6);
    let mut latencies: Vec<f64> = rows
        .iter()
        .filter_map(|t| t.started_at)
        .map(|at| (at.timestamp_micros() - sent) as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);

    // The ceiling, on the same Redis with the farm stopped.
    farm.workers.clear();
    farm.coordinator = None;
    drop(store);
    let raw = raw_roundtrips(redis_url, args).await?;

    let tasks_per_s = f64::from(args.tasks) / e2e_s;
    Ok(OrchestrationReport {
        tasks: args.tasks,
        workers: args.workers,
        concurrency: args.concurrency,
        max_batch: args.max_batch,
        tasks_per_s: round(tasks_per_s, 1),
        raw_roundtrips_per_s: round(raw, 1),
        ratio: round(tasks_per_s / raw, 4),
        p50_ms: round(percentile_f(&latencies, 50.0), 2),
        p99_ms: round(percentile_f(&latencies, 99.0), 2),
        idle_p50_ms: round(percentile_f(&idle, 50.0), 2),
        idle_p99_ms: round(percentile_f(&idle, 99.0), 2),
        persist_ms: round(persist_ms, 1),
        wall_s: 0.0,
        succeeded,
        objects: 0,
    })
}

/// Nearest-rank percentile of sorted values (the chaos report's rule), in f64.
fn percentile_f(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Polls Postgres until the job is terminal; returns its tasks.
async fn wait_job(
    store: &farm_coordinator::Store,
    id: JobId,
    every: Duration,
    timeout_s: u64,
) -> anyhow::Result<Vec<farm_coordinator::store::TaskRow>> {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let job = store.job(id).await?.context("the job vanished")?;
        if job.status.is_terminal() {
            return Ok(store.tasks(id).await?);
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} not done after {timeout_s} s: {} of {} succeeded",
                job.tasks_succeeded,
                job.tasks_total
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// N dispatch messages through Redis as the farm moves them, without Postgres: a producer
/// XADDs pipelined batches of up to 1000, each message to one consumer's own stream, while
/// fewer than 2 x slots x max-batch are outstanding (the dispatcher's prefetch); W consumers,
/// each on its own connections like a worker process, XREADGROUP up to max-batch messages at
/// a time and XACK + XDEL them together, as a worker does per batch.
async fn raw_roundtrips(redis_url: &str, args: &OrchestrationArgs) -> anyhow::Result<f64> {
    let n = u64::from(args.tasks);
    let window = (2 * args.workers * args.concurrency * args.max_batch.max(1)) as u64;
    let per_read = args.max_batch.max(1);
    let producer = Queue::connect(redis_url, "bench-raw").await?;
    let acked = Arc::new(AtomicU64::new(0));
    let job = JobId::new();
    let spec = |index: u32| TaskSpec {
        task: TaskRef { job, index },
        attempt: Attempt(1),
        mode: Mode::Txt2Img,
        model: NULL_MODEL.into(),
        prompt: "a benchmark".into(),
        negative_prompt: String::new(),
        seed: u64::from(index) + 1,
        width: 64,
        height: 64,
        steps: 1,
        guidance_scale: 7.5,
        scheduler: SchedulerName::Pndm,
        object_key: farm_core::object_key("bench", job, index, u64::from(index) + 1),
        strength: 0.8,
        vae: None,
        init_image: None,
        mask: None,
        train: None,
    };
    let mut consumers = tokio::task::JoinSet::new();
    let ids: Vec<WorkerId> = (0..args.workers)
        .map(|w| WorkerId(format!("raw-{w}")))
        .collect();
    for me in ids.clone() {
        let queue = Queue::connect(redis_url, "bench-raw").await?;
        queue.ensure_worker_stream(&me).await?;
        let acked = acked.clone();
        consumers.spawn(async move {
            let mut acks = tokio::task::JoinSet::new();
            while acked.load(Ordering::Relaxed) < n {
                let got = queue
                    .read_tasks(&me, per_read, Duration::from_millis(100))
                    .await?;
                if !got.is_empty() {
                    // One acknowledgement per read, like a worker per batch.
                    let ids: Vec<String> = got.into_iter().map(|d| d.id).collect();
                    let (queue, acked, me) = (queue.clone(), acked.clone(), me.clone());
                    acks.spawn(async move {
                        queue.ack_tasks(&me, &ids).await?;
                        acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        anyhow::Ok(())
                    });
                }
                while let Some(done) = acks.try_join_next() {
                    done??;
                }
            }
            while let Some(done) = acks.join_next().await {
                done??;
            }
            anyhow::Ok(())
        });
    }
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let outstanding = sent - acked.load(Ordering::Relaxed);
        let room = window
            .saturating_sub(outstanding)
            .min(DISPATCH_BATCH)
            .min(n - sent);
        if room == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        // Like the dispatcher: each message to one worker's own stream.
        let batch: Vec<TaskSpec> = (sent..sent + room).map(|i| spec(i as u32)).collect();
        let placed: Vec<(&WorkerId, &TaskSpec)> = batch
            .iter()
            .enumerate()
            .map(|(i, t)| (&ids[(sent as usize + i) % ids.len()], t))
            .collect();
        producer.dispatch(&placed).await?;
        sent += room;
    }
    while let Some(done) = consumers.join_next().await {
        done??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
