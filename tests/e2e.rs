//! End to end: a real coordinator and real worker processes (the `farm` binary) against the
//! real Postgres, Redis and an S3 server (moto), rendering with the tiny model.
//!
//! Each test gets its own database, Redis key prefix, S3 server and bucket, so tests run in
//! parallel. Needs: Postgres on 127.0.0.1:5432 (trust auth), Redis on 127.0.0.1:6379 and
//! `moto_server` on PATH (`pip install 'moto[server]'`); `.ci/run` provides all three.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm_proto::v1 as pb;
use farm_proto::v1::cluster_service_client::ClusterServiceClient;
use farm_proto::v1::job_service_client::JobServiceClient;
use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// Adds `authorization: Bearer <token>` (or nothing) to every request.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;
type Cluster = ClusterServiceClient<InterceptedService<Channel, Bearer>>;

#[path = "support/mod.rs"]
mod support;
use support::{free_port, wait_for_port, Proc};

const FARM: &str = env!("CARGO_BIN_EXE_farm");
const BUCKET: &str = "farm-e2e";

/// One S3 server (moto) with one bucket.
struct S3 {
    port: u16,
    proc: Option<Proc>,
}

impl S3 {
    fn start() -> S3 {
        let mut s3 = S3 {
            port: free_port(),
            proc: None,
        };
        s3.up();
        s3
    }

    /// Starts the server (again, empty) on its port and creates the bucket.
    fn up(&mut self) {
        let port = self.port;
        let server = std::env::var("FARM_TEST_S3_SERVER").unwrap_or_else(|_| "moto_server".into());
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {server} (pip install 'moto[server]'): {e}"));
        self.proc = Some(Proc(child));
        wait_for_port(port, "moto_server");
        // Create the bucket: a plain PUT, which moto accepts unsigned.
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to S3");
        write!(
            conn,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("create bucket");
        let mut reply = String::new();
        let _ = conn.read_to_string(&mut reply);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "bucket creation failed: {reply}"
        );
    }

    fn down(&mut self) {
        self.proc = None;
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_bucket_name(BUCKET)
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_region("us-east-1")
                .with_allow_http(true)
                .build()
                .expect("s3 client"),
        )
    }
}

/// A whole farm: its own database, Redis prefix, S3 server, models, coordinator and workers.
struct Farm {
    name: String,
    models: tempfile::TempDir,
    s3: S3,
    grpc_port: u16,
    http_port: u16,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
    /// Workers started so far (names stay unique after some are stopped).
    started_workers: usize,
    /// An admin token of tenant `e2e`.
    token: String,
    /// Another Postgres than the shared one, when set.
    name_db_url: Option<String>,
    /// Environment set last, over the defaults above.
    env_overrides: Vec<(String, String)>,
}

impl Farm {
    fn new(workers: usize) -> Farm {
        let name = format!(
            "farm_e2e_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let models = tempfile::tempdir().expect("tempdir");
        let mut farm = Farm {
            name,
            models,
            s3: S3::start(),
            grpc_port: free_port(),
            http_port: free_port(),
            coordinator: None,
            workers: Vec::new(),
            started_workers: 0,
            token: String::new(),
            name_db_url: None,
            env_overrides: Vec::new(),
        };
        let out = farm.farm(&[
            "model",
            "init-tiny",
            &farm.models.path().join("tiny").display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "init-tiny: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        farm.token = farm.create_token("e2e", true);
        farm.start_coordinator();
        for _ in 0..workers {
            farm.start_worker();
        }
        farm
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(FARM);
        cmd.env(
            "FARM_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{}", self.name),
        )
        .env("FARM_REDIS_URL", "redis://127.0.0.1:6379")
        .env("FARM_REDIS_PREFIX", &self.name)
        .env("FARM_STORAGE", format!("s3://{BUCKET}"))
        .env("FARM_MODELS", self.models.path())
        .env(
            "FARM_COORDINATOR",
            format!("http://127.0.0.1:{}", self.grpc_port),
        )
        .env("AWS_ENDPOINT_URL", self.s3.endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("RUST_LOG", "warn");
        if !self.token.is_empty() {
            cmd.env("FARM_TOKEN", &self.token);
        }
        if let Some(url) = &self.name_db_url {
            cmd.env("FARM_DATABASE_URL", url);
        }
        cmd.envs(self.env_overrides.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn create_token(&self, tenant: &str, admin: bool) -> String {
        let mut args = vec!["token", "create", "--tenant", tenant];
        if admin {
            args.push("--admin");
        }
        let out = self.farm(&args);
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn farm(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run farm")
    }

    fn start_coordinator(&mut self) {
        self.start_coordinator_with(&[]);
    }

    fn start_coordinator_with(&mut self, extra: &[&str]) {
        let child = self
            .command()
            .args([
                "coordinator",
                "--grpc-addr",
                &format!("127.0.0.1:{}", self.grpc_port),
                "--http-addr",
                &format!("127.0.0.1:{}", self.http_port),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start coordinator");
        self.coordinator = Some(Proc(child));
        wait_for_port(self.grpc_port, "coordinator");
    }

    fn kill_coordinator(&mut self) {
        // Drop kills with SIGKILL: no graceful shutdown.
        self.coordinator = None;
    }

    fn start_worker(&mut self) {
        self.start_worker_with(&[]);
    }

    /// Starts worker `{name}-w{n}` (n counts the workers started, from 0) with extra flags;
    /// returns its id.
    fn start_worker_with(&mut self, extra: &[&str]) -> String {
        let id = format!("{}-w{}", self.name, self.started_workers);
        self.started_workers += 1;
        let child = self
            .command()
            .args(["worker", "--concurrency", "1", "--id", &id])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start worker");
        self.workers.push(Proc(child));
        id
    }

    /// Writes another tiny model (other weights) named `name` into the models root.
    fn add_tiny_model(&self, name: &str, seed: u64) -> u64 {
        let dir = self.models.path().join(name);
        let out = self.farm(&[
            "model",
            "init-tiny",
            &dir.display().to_string(),
            "--seed",
            &seed.to_string(),
        ]);
        assert!(out.status.success(), "init-tiny {name}");
        weight_bytes(&dir)
    }

    async fn workers(&self) -> Vec<pb::Worker> {
        let mut cluster = self.cluster_with(Some(&self.token)).await;
        cluster
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("workers")
            .into_inner()
            .workers
    }

    /// Waits until worker `id`'s heartbeat says `ok`.
    async fn wait_worker(
        &self,
        id: &str,
        what: &str,
        ok: impl Fn(&pb::Worker) -> bool,
    ) -> pb::Worker {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(w) = self.workers().await.into_iter().find(|w| w.id == id) {
                if ok(&w) {
                    return w;
                }
                assert!(
                    Instant::now() < deadline,
                    "worker {id}: never {what}: {w:?}"
                );
            }
            assert!(Instant::now() < deadline, "worker {id} never came online");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client(&self) -> Jobs {
        self.client_with(Some(&self.token)).await
    }

    async fn channel(&self) -> Channel {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot connect to the coordinator: {e}"),
            }
        }
    }

    /// Waits until `n` workers have sent a heartbeat.
    async fn wait_workers_online(&self, n: usize) {
        let mut cluster = self.cluster_with(Some(&self.token)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let workers = cluster
                .list_workers(pb::ListWorkersRequest {})
                .await
                .expect("workers")
                .into_inner()
                .workers;
            if workers.iter().filter(|w| w.online).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "workers never came online");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client_with(&self, token: Option<&str>) -> Jobs {
        JobServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    async fn cluster_with(&self, token: Option<&str>) -> Cluster {
        ClusterServiceClient::with_interceptor(self.channel().await, bearer(token))
    }
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")))
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.workers.clear();
        self.coordinator = None;
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn spec(prompts: &[&str], seeds: &[u64], steps: u32) -> pb::JobSpec {
    pb::JobSpec {
        mode: "txt2img".into(),
        model: "tiny".into(),
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "blurry".into(),
        seeds: seeds.to_vec(),
        width: 64,
        height: 64,
        steps,
        guidance_scale: Some(7.5),
        scheduler: "pndm".into(),
        ..Default::default()
    }
}

async fn submit(client: &mut Jobs, spec: pb::JobSpec, key: &str) -> pb::SubmitJobResponse {
    client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
}

fn is_terminal(job: &pb::Job) -> bool {
    matches!(
        pb::JobStatus::try_from(job.status),
        Ok(pb::JobStatus::Succeeded | pb::JobStatus::Failed | pb::JobStatus::Cancelled)
    )
}

/// Polls until the job ends (reconnecting through coordinator restarts).
async fn wait_done(farm: &Farm, id: &str, limit: Duration) -> pb::Job {
    let deadline = Instant::now() + limit;
    loop {
        let mut client = farm.client().await;
        if let Ok(job) = client
            .get_job(pb::GetJobRequest {
                job_id: id.into(),
                include_tasks: true,
            })
            .await
        {
            let job = job.into_inner();
            if is_terminal(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish in {limit:?}: {} of {} succeeded",
                job.tasks_succeeded,
                job.tasks_total
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What a worker's model cache counts a model folder as when it computes in f32: the tensor
/// data of its three (f32) weight files, i.e. each file without its 8-byte length and header.
fn weight_bytes(dir: &Path) -> u64 {
    [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    .iter()
    .map(|f| {
        let bytes = std::fs::read(dir.join(f)).expect("weights");
        let header = u64::from_le_bytes(bytes[..8].try_into().expect("length"));
        bytes.len() as u64 - 8 - header
    })
    .sum()
}

async fn object(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let path = object_store::path::Path::parse(key).expect("key");
    store
        .get(&path)
        .await
        .expect("object exists")
        .bytes()
        .await
        .expect("object bytes")
        .to_vec()
}

const PROMPTS: [&str; 3] = [
    "a photograph of an astronaut riding a horse",
    "An avocado armchair",
    "A white dog wearing sunglasses",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_job_flows_through_the_farm_into_s3() {
    let farm = Farm::new(2);
    let mut client = farm.client().await;
    let store = farm.s3.store();

    let submitted = submit(&mut client, spec(&PROMPTS, &[1, 2, 3, 4], 4), "").await;
    assert!(submitted.created);
    let id = submitted.job.expect("job").id;
    let job = wait_done(&farm, &id, Duration::from_secs(300)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    assert_eq!((job.tasks_total, job.tasks_succeeded), (12, 12));
    assert_eq!(job.tasks.len(), 12);

    for task in &job.tasks {
        let (prompt, seed) = (
            PROMPTS[task.index as usize / 4],
            [1, 2, 3, 4][task.index as usize % 4],
        );
        assert_eq!((task.prompt.as_str(), task.seed), (prompt, seed));
        assert_eq!(
            task.object_key,
            format!("{}/jobs/{id}/{:06}-{seed}.png", farm.name, task.index)
        );
        let bytes = object(&*store, &task.object_key).await;
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            task.sha256,
            "sha256 of task {}",
            task.index
        );
        assert_eq!(bytes.len() as u64, task.size_bytes);
        let img = image::load_from_memory(&bytes).expect("a PNG");
        assert_eq!((img.width(), img.height()), (64, 64));
        let params = farm_worker::png::read_parameters(&bytes).expect("parameters chunk");
        assert_eq!(
            (params.prompt.as_str(), params.seed, params.steps),
            (prompt, seed, 4)
        );
        assert_eq!(params.negative_prompt, "blurry");
        assert!(task.attempts >= 1);
    }
    // The tiny model's images differ by seed.
    assert_ne!(job.tasks[0].sha256, job.tasks[1].sha256);

    // Images are handed out as expiring presigned URLs, never with storage credentials.
    let image = client
        .get_task_image(pb::GetTaskImageRequest {
            job_id: id.clone(),
            index: 0,
        })
        .await
        .expect("image")
        .into_inner();
    assert!(image.png.is_empty());
    assert!(
        image.url.contains("X-Amz-Signature") && image.url.contains("X-Amz-Expires"),
        "{}",
        image.url
    );
    assert!(!image.url.contains("AWS_SECRET") && image.url_expires_at_ms > 0);

    // Same seed and prompt, another job: the same bytes.
    let again = submit(&mut client, spec(&PROMPTS[..1], &[1], 4), "").await;
    let again = wait_done(&farm, &again.job.expect("job").id, Duration::from_secs(120)).await;
    assert_eq!(again.tasks[0].sha256, job.tasks[0].sha256);
    assert_eq!(
        object(&*store, &again.tasks[0].object_key).await,
        object(&*store, &job.tasks[0].object_key).await
    );

    // A repeated idempotency key returns the same job.
    let first = submit(&mut client, spec(&PROMPTS[..1], &[9], 2), "retry-me").await;
    let second = submit(&mut client, spec(&PROMPTS[..1], &[9], 2), "retry-me").await;
    assert!(first.created && !second.created);
    assert_eq!(first.job.expect("job").id, second.job.expect("job").id);

    // Width 65 is refused, naming the field, and nothing is written.
    let before = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len();
    let mut bad = spec(&PROMPTS[..1], &[1], 2);
    bad.width = 65;
    let err = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(bad),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("width 65 must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("width"), "{}", err.message());
    let after = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .len();
    assert_eq!(before, after);

    // The CLI: the same refusal as a message and a non-zero exit...
    let out = farm.farm(&["submit", "--prompt", "x", "--width", "65", "--seed", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid argument") && stderr.contains("width"),
        "{stderr}"
    );
    // ...and a waited job as the documented JSON.
    let out = farm.farm(&[
        "submit", "--prompt", "an otter", "--seeds", "5,6", "--width", "64", "--height", "64",
        "--steps", "2", "--wait", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON job");
    assert_eq!(json["status"], "succeeded");
    assert_eq!(json["tasks_total"], 2);
    assert_eq!(json["tasks"][1]["seed"], 6);
    assert!(json["tasks"][0]["sha256"]
        .as_str()
        .is_some_and(|s| s.len() == 64));
    let fetched = tempfile::tempdir().expect("tempdir");
    let job_id = json["id"].as_str().expect("id");
    let out = farm.farm(&[
        "fetch",
        job_id,
        "--out",
        &fetched.path().display().to_string(),
        "--grid",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grid = image::open(fetched.path().join("grid.png")).expect("grid");
    assert_eq!((grid.width(), grid.height()), (128, 64));
    assert!(file_exists(&fetched.path().join("000001-6.png")));

    let workers = farm
        .cluster_with(Some(&farm.token))
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("workers")
        .into_inner()
        .workers;
    assert_eq!(workers.iter().filter(|w| w.online).count(), 2);
    assert_eq!(
        workers.iter().map(|w| w.tasks_done).sum::<u64>(),
        12 + 1 + 1 + 2
    );
}

fn file_exists(p: &Path) -> bool {
    PathBuf::from(p).is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_survives_a_coordinator_restart() {
    let mut farm = Farm::new(2);
    let mut client = farm.client().await;
    let seeds: Vec<u64> = (100..132).collect();
    let id = submit(&mut client, spec(&PROMPTS[..1], &seeds, 8), "")
        .await
        .job
        .expect("job")
        .id;

    // Let part of the job finish, then kill the coordinator hard.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let job = client
            .get_job(pb::GetJobRequest {
                job_id: id.clone(),
                include_tasks: false,
            })
            .await
            .expect("get")
            .into_inner();
        if job.tasks_succeeded >= 2 {
            assert!(
                job.tasks_succeeded < 32,
                "job finished before the restart; make it longer"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    farm.kill_coordinator();
    // Workers go on meanwhile; their events wait in Redis.
    tokio::time::sleep(Duration::from_secs(2)).await;
    farm.start_coordinator();

    let job = wait_done(&farm, &id, Duration::from_secs(300)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    assert_eq!(job.tasks_succeeded, 32);
    let store = farm.s3.store();
    for task in &job.tasks {
        assert_eq!(task.status, pb::TaskStatus::Succeeded as i32);
        // No lease expired during a short outage: every task ran exactly once.
        assert_eq!(
            task.attempts, 1,
            "task {} ran {} times",
            task.index, task.attempts
        );
        let bytes = object(&*store, &task.object_key).await;
        assert_eq!(hex::encode(Sha256::digest(&bytes)), task.sha256);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_kept_apart_and_tokens_required() {
    let farm = Farm::new(0);
    let alice = farm.create_token("alice", false);
    let bob = farm.create_token("bob", false);
    let mut as_alice = farm.client_with(Some(&alice)).await;
    let mut as_bob = farm.client_with(Some(&bob)).await;

    let id = submit(&mut as_alice, spec(&PROMPTS[..1], &[1, 2], 2), "")
        .await
        .job
        .expect("job")
        .id;
    let get = |job_id: &str| pb::GetJobRequest {
        job_id: job_id.to_string(),
        include_tasks: true,
    };
    assert_eq!(
        as_alice
            .get_job(get(&id))
            .await
            .expect("own job")
            .into_inner()
            .tasks
            .len(),
        2
    );

    // Bob cannot see, watch, cancel or fetch Alice's job: to him it does not exist.
    let code = |r: Result<tonic::Response<pb::Job>, tonic::Status>| r.expect_err("refused").code();
    assert_eq!(code(as_bob.get_job(get(&id)).await), tonic::Code::NotFound);
    assert_eq!(
        code(
            as_bob
                .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
                .await
        ),
        tonic::Code::NotFound
    );
    let watched = as_bob
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await;
    assert_eq!(watched.expect_err("refused").code(), tonic::Code::NotFound);
    let image = as_bob
        .get_task_image(pb::GetTaskImageRequest {
            job_id: id.clone(),
            index: 0,
        })
        .await;
    assert_eq!(image.expect_err("refused").code(), tonic::Code::NotFound);
    let listed = as_bob
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.jobs.is_empty());
    // Only admins see the cluster; the admin sees every job.
    let workers = farm
        .cluster_with(Some(&bob))
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await;
    assert_eq!(
        workers.expect_err("refused").code(),
        tonic::Code::PermissionDenied
    );
    let mut admin = farm.client().await;
    assert_eq!(
        admin
            .get_job(get(&id))
            .await
            .expect("admin sees it")
            .into_inner()
            .id,
        id
    );

    // No token, or a wrong one: UNAUTHENTICATED. Health needs none.
    let mut anonymous = farm.client_with(None).await;
    let listed = anonymous.list_jobs(pb::ListJobsRequest::default()).await;
    assert_eq!(
        listed.expect_err("refused").code(),
        tonic::Code::Unauthenticated
    );
    let mut forged = farm.client_with(Some("farm_0000")).await;
    let listed = forged.list_jobs(pb::ListJobsRequest::default()).await;
    assert_eq!(
        listed.expect_err("refused").code(),
        tonic::Code::Unauthenticated
    );
    let out = farm
        .command()
        .env_remove("FARM_TOKEN")
        .args(["list"])
        .output()
        .expect("farm list");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FARM_TOKEN"));

    // Bob can cancel his own job.
    let own = submit(&mut as_bob, spec(&PROMPTS[..1], &[3], 2), "")
        .await
        .job
        .expect("job")
        .id;
    let cancelled = as_bob
        .cancel_job(pb::CancelJobRequest { job_id: own })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status, pb::JobStatus::Cancelled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_are_refused_and_cancel_stops_a_running_task() {
    let farm = Farm::new(1);
    let mut client = farm.client().await;
    let mut cluster = farm.cluster_with(Some(&farm.token)).await;
    // The worker's first heartbeat lists the models it has.
    farm.wait_workers_online(1).await;
    let mut unknown = spec(&PROMPTS[..1], &[1], 2);
    unknown.model = "sd-9000".into();
    let err = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(unknown),
            idempotency_key: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("unknown model");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("model"), "{}", err.message());

    // A long task (900 steps) is cancelled once it runs: the worker lets go of it within a
    // step or so, long before it could have finished, and writes no image.
    let id = submit(&mut client, spec(&PROMPTS[..1], &[1, 2], 900), "")
        .await
        .job
        .expect("job")
        .id;
    let mut events = client
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no progress from the running task"
        );
        if let Some(pb::JobEvent {
            event: Some(pb::job_event::Event::Progress(p)),
        }) = events.message().await.expect("watch stream")
        {
            if p.step >= 2 {
                break;
            }
        }
    }
    let cancelled = client
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status, pb::JobStatus::Cancelled as i32);
    assert_eq!(cancelled.tasks_cancelled, 2);
    let cancelled_at = Instant::now();
    loop {
        let workers = cluster
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("workers")
            .into_inner()
            .workers;
        if workers.iter().all(|w| w.running == 0) {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(10),
            "the worker kept rendering a cancelled task"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: id,
            include_tasks: true,
        })
        .await
        .expect("job")
        .into_inner();
    assert!(job
        .tasks
        .iter()
        .all(|t| t.status == pb::TaskStatus::Cancelled as i32 && t.object_key.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_survive_storage_downtime_and_never_succeed_without_an_object() {
    let mut farm = Farm::new(1);
    let mut client = farm.client().await;
    farm.wait_workers_online(1).await;
    farm.s3.down();
    let mut job_spec = spec(&PROMPTS[..1], &[7, 8], 2);
    job_spec.max_attempts = 10;
    let id = submit(&mut client, job_spec, "").await.job.expect("job").id;

    // While storage is down nothing may be recorded as succeeded; failed uploads are retried
    // and their attempts requeued.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = client
            .get_job(pb::GetJobRequest {
                job_id: id.clone(),
                include_tasks: true,
            })
            .await
            .expect("job")
            .into_inner();
        assert_eq!(job.tasks_succeeded, 0, "succeeded without storage: {job:?}");
        if job
            .tasks
            .iter()
            .any(|t| t.attempts >= 2 && t.error.contains("upload"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed upload was requeued: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    farm.s3.up();
    let job = wait_done(&farm, &id, Duration::from_secs(120)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    let store = farm.s3.store();
    for task in &job.tasks {
        let bytes = object(&*store, &task.object_key).await;
        assert_eq!(hex::encode(Sha256::digest(&bytes)), task.sha256);
    }
}

fn png_bytes(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode png");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_runs_on_the_farm_with_uploaded_inputs() {
    let farm = Farm::new(1);
    let mut client = farm.client().await;
    let init = png_bytes(64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 128]);
    // A mask of another size but the same aspect ratio is accepted (and resized).
    let mask = png_bytes(128, 128, |x, y| {
        if (32..96).contains(&x) && (32..96).contains(&y) {
            [255; 3]
        } else {
            [0; 3]
        }
    });
    let request = |mode: &str, mask: &[u8], strength: Option<f64>| {
        let mut s = spec(&PROMPTS[..1], &[5], 4);
        s.mode = mode.into();
        s.width = 0;
        s.height = 0;
        s.strength = strength;
        pb::SubmitJobRequest {
            spec: Some(s),
            init_image: init.clone(),
            mask: mask.to_vec(),
            ..Default::default()
        }
    };
    let mut ids = Vec::new();
    for (mode, mask, strength) in [
        ("img2img", &[][..], Some(0.5)),
        ("inpaint", &mask[..], Some(0.75)),
        ("reconstruct", &[][..], None),
    ] {
        let job = client
            .submit_job(request(mode, mask, strength))
            .await
            .expect(mode)
            .into_inner();
        ids.push((mode, job.job.expect("job").id));
    }
    let store = farm.s3.store();
    for (mode, id) in ids {
        let job = wait_done(&farm, &id, Duration::from_secs(120)).await;
        assert_eq!(
            job.status,
            pb::JobStatus::Succeeded as i32,
            "{mode}: {job:?}"
        );
        let spec = job.spec.clone().expect("spec");
        assert!(spec.init_image_key.contains("/inputs/"), "{mode}: {spec:?}");
        let bytes = object(&*store, &job.tasks[0].object_key).await;
        let img = image::load_from_memory(&bytes).expect("png");
        assert_eq!((img.width(), img.height()), (64, 64), "{mode}");
        let params = farm_worker::png::read_parameters(&bytes).expect("parameters");
        assert_eq!(params.mode, mode);
        assert_eq!(
            params.init_image.as_deref(),
            Some(spec.init_image_key.as_str())
        );
        if mode == "inpaint" {
            assert_eq!(params.strength, Some(0.75));
            assert_eq!(params.mask.as_deref(), Some(spec.mask_key.as_str()));
        }
    }

    // Bad inputs, each named: another aspect ratio, a format we do not take, strength > 1,
    // an init image for txt2img, no mask for inpaint.
    let narrow = png_bytes(128, 64, |_, _| [255; 3]);
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let mut txt2img = request("txt2img", &[], None);
    txt2img.spec.as_mut().expect("spec").width = 64;
    let mut gif_request = request("img2img", &[], None);
    gif_request.init_image = gif;
    for (field, bad) in [
        ("mask", request("inpaint", &narrow, None)),
        ("mask", request("inpaint", &[], None)),
        ("init_image", gif_request),
        ("strength", request("img2img", &[], Some(1.5))),
        ("init_image", txt2img),
    ] {
        let err = client.submit_job(bad).await.expect_err(field);
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }

    // The CLI uploads the files itself.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("init.png");
    std::fs::write(&path, &init).expect("write init");
    let out = farm.farm(&[
        "submit",
        "--mode",
        "img2img",
        "--init-image",
        &path.display().to_string(),
        "--strength",
        "0.6",
        "--prompt",
        "an otter",
        "--seed",
        "3",
        "--steps",
        "4",
        "--wait",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["status"], "succeeded");
}

#[test]
fn bad_worker_and_tenant_flags_say_what_to_use() {
    // Each refusal comes before any connection (the services named here do not exist).
    let models = tempfile::tempdir().expect("tempdir");
    let refused = |args: &[&str], expect: &[&str]| {
        let out = Command::new(FARM)
            .args(args)
            .env("FARM_REDIS_URL", "redis://127.0.0.1:1")
            .env("FARM_DATABASE_URL", "postgres://postgres@127.0.0.1:1/farm")
            .env("FARM_MODELS", models.path())
            .env("FARM_STORAGE", models.path())
            .output()
            .expect("run farm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        for needle in expect {
            assert!(
                stderr.contains(needle),
                "{args:?}: {needle:?} not in {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The flag is refused, not a connection attempted.
        assert!(!stderr.contains("127.0.0.1:1"), "{args:?}: {stderr}");
    };
    refused(
        &["worker", "--max-batch", "0"],
        &["--max-batch must be between 1 and 64"],
    );
    refused(
        &["worker", "--max-batch", "65"],
        &["--max-batch must be between 1 and 64"],
    );
    refused(
        &["worker", "--model-cache-bytes", "lots"],
        &["--model-cache-bytes", "is not a size (e.g. 8GiB"],
    );
    refused(
        &["worker", "--device-memory", "3 parsecs"],
        &["--device-memory", "is not a size"],
    );
    refused(
        &["worker", "--modes", "txt2img,txt2video"],
        &["--modes", "unknown mode \"txt2video\"", "img2img"],
    );
    refused(&["worker", "--max-pixels", "many"], &["--max-pixels"]);
    for weight in ["0", "-1", "1001", "NaN", "inf"] {
        refused(
            &["tenant", "weight", "--tenant", "a", "--weight", weight],
            &["--weight must be a number above 0 and at most 1000"],
        );
    }
    refused(
        &["tenant", "weight", "--tenant", "a", "--weight", "heavy"],
        &["--weight", "heavy"],
    );
    refused(
        &["bench", "memory", "--arch", "sd21"],
        &["--arch sd21: use sd15 or tiny"],
    );
    refused(
        &["bench", "memory", "--arch", "tiny", "--dtype", "f8"],
        &["--dtype f8: use f32, f16 or bf16"],
    );
    // A folder that holds no model: the loading process says so.
    let empty = models.path().display().to_string();
    refused(
        &[
            "bench",
            "memory",
            "--load-only",
            "--arch",
            "tiny",
            "--dir",
            &empty,
        ],
        &["cannot load", "model_index.json"],
    );
}

#[test]
fn unreachable_services_are_named_without_their_secrets() {
    let farm_bin = || {
        let mut cmd = Command::new(FARM);
        cmd.env("RUST_LOG", "info");
        cmd
    };
    let out = farm_bin()
        .args(["migrate"])
        .env(
            "FARM_DATABASE_URL",
            "postgres://postgres:s3cret-pw@127.0.0.1:1/farm",
        )
        .output()
        .expect("farm migrate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("start it"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");

    let models = tempfile::tempdir().expect("tempdir");
    let out = farm_bin()
        .args(["worker"])
        .env("FARM_REDIS_URL", "redis://:s3cret-pw@127.0.0.1:1")
        .env("FARM_MODELS", models.path())
        .env("FARM_STORAGE", models.path())
        .output()
        .expect("farm worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("FARM_REDIS_URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_is_served_over_tls_with_a_given_certificate() {
    let mut farm = Farm::new(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_certs(dir.path());
    farm.kill_coordinator();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    farm.start_coordinator_with(&["--tls-cert", &c, "--tls-key", &k]);

    let https = format!("https://localhost:{}", farm.grpc_port);
    let out = farm
        .command()
        .args(["list"])
        .env("FARM_COORDINATOR", &https)
        .env("FARM_TLS_CA", &ca)
        .output()
        .expect("farm list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("JOB"));
    // Without trusting the certificate, or in plain text, nothing gets through.
    let out = farm
        .command()
        .args(["list"])
        .env("FARM_COORDINATOR", &https)
        .output()
        .expect("farm list");
    assert!(!out.status.success());
    let out = farm.command().args(["list"]).output().expect("farm list");
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finetune_resumes_after_a_kill_and_publishes_a_model() {
    let mut farm = Farm::new(2);
    farm.kill_coordinator();
    farm.start_coordinator_with(&["--run-lease-secs", "3"]);
    farm.wait_workers_online(2).await;
    let mut client = farm.client().await;
    let data = tempfile::tempdir().expect("tempdir");
    for (i, caption) in ["a red square", "a green field", "a blue sky"]
        .iter()
        .enumerate()
    {
        let png = png_bytes(64, 64, |x, y| {
            [(x * 4) as u8 ^ (i as u8 * 80), (y * 4) as u8, 60 * i as u8]
        });
        std::fs::write(data.path().join(format!("{i}.png")), png).expect("image");
        std::fs::write(data.path().join(format!("{i}.txt")), caption).expect("caption");
    }
    let files: Vec<pb::DatasetFile> = std::fs::read_dir(data.path())
        .expect("dataset")
        .map(|e| {
            let path = e.expect("entry").path();
            pb::DatasetFile {
                name: path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                data: std::fs::read(&path).expect("read"),
            }
        })
        .collect();
    let finetune = |output: &str, resolution: u32| pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            mode: "finetune".into(),
            model: "tiny".into(),
            output_model: output.into(),
            train_steps: 24,
            checkpoint_every: 4,
            resolution,
            ..Default::default()
        }),
        dataset_files: files.clone(),
        ..Default::default()
    };
    let bad = client
        .submit_job(finetune("mine", 100))
        .await
        .expect_err("resolution 100");
    assert!(bad.message().starts_with("resolution"), "{}", bad.message());
    let id = client
        .submit_job(finetune("mine", 64))
        .await
        .expect("finetune")
        .into_inner()
        .job
        .expect("job")
        .id;

    // Follow the steps; once a checkpoint is stored (step > 4), kill the worker training.
    let mut events = client
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let mut killed = false;
    let mut steps_after_kill = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), events.message())
        .await
        .expect("watch went quiet")
        .expect("watch stream")
    {
        assert!(Instant::now() < deadline, "finetune did not finish");
        match event.event {
            Some(pb::job_event::Event::Progress(p)) => {
                assert!(p.loss.is_some_and(f32::is_finite), "{p:?}");
                if killed {
                    steps_after_kill.push(p.step);
                } else if p.step >= 6 {
                    // Workers are named `{farm}-w{index}`: kill the one training.
                    let index: usize = p
                        .worker
                        .strip_prefix(&format!("{}-w", farm.name))
                        .and_then(|n| n.parse().ok())
                        .expect("a worker of this farm");
                    farm.workers.remove(index);
                    killed = true;
                }
            }
            Some(pb::job_event::Event::Snapshot(job)) if is_terminal(&job) => break,
            _ => {}
        }
    }
    let job = wait_done(&farm, &id, Duration::from_secs(60)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    assert_eq!(job.tasks[0].attempts, 2, "{job:?}");
    // The second attempt resumed from the stored checkpoint instead of starting over.
    let first = steps_after_kill
        .iter()
        .min()
        .copied()
        .expect("progress after the kill");
    assert!(first > 1, "restarted from scratch: {steps_after_kill:?}");
    assert_eq!(steps_after_kill.iter().max().copied(), Some(24));
    assert!(job.tasks[0]
        .object_key
        .ends_with("/models/mine/model_index.json"));

    // The published model renders on a worker that never had it, and its name is taken.
    let mut render = spec(&PROMPTS[..1], &[1], 2);
    render.model = "mine".into();
    let rendered = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(render),
            ..Default::default()
        })
        .await
        .expect("render")
        .into_inner();
    let rendered = wait_done(
        &farm,
        &rendered.job.expect("job").id,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        rendered.status,
        pb::JobStatus::Succeeded as i32,
        "{rendered:?}"
    );
    let taken = client
        .submit_job(finetune("mine", 64))
        .await
        .expect_err("name taken");
    assert_eq!(
        taken.code(),
        tonic::Code::AlreadyExists,
        "{}",
        taken.message()
    );

    // The CLI refuses an empty dataset folder with a message that says what to do.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = farm.farm(&[
        "submit",
        "--mode",
        "finetune",
        "--output-model",
        "other",
        "--data",
        &empty.path().display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("captions"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_dispatch_a_task_twice_and_sigterm_drains_a_worker() {
    let mut farm = Farm::new(2);
    // A second coordinator on the same Postgres and Redis, with its own consumer name.
    let second_port = free_port();
    let _second = Proc(
        farm.command()
            .args([
                "coordinator",
                "--id",
                "coordinator-b",
                "--grpc-addr",
                &format!("127.0.0.1:{second_port}"),
                "--http-addr",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("second coordinator"),
    );
    wait_for_port(second_port, "second coordinator");
    let mut client = farm.client().await;
    let seeds: Vec<u64> = (0..40).collect();
    let id = submit(&mut client, spec(&PROMPTS[..1], &seeds, 6), "")
        .await
        .job
        .expect("job")
        .id;

    // Once tasks run, SIGTERM one worker: it finishes what it holds and exits cleanly.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = client
            .get_job(pb::GetJobRequest {
                job_id: id.clone(),
                include_tasks: false,
            })
            .await
            .expect("job")
            .into_inner();
        if job.tasks_succeeded >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut drained = farm.workers.remove(0);
    let pid = drained.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let status = tokio::task::spawn_blocking(move || drained.0.wait().expect("wait"))
        .await
        .expect("join");
    assert!(
        status.success(),
        "the worker did not exit cleanly on SIGTERM: {status:?}"
    );

    let job = wait_done(&farm, &id, Duration::from_secs(180)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    // Every task was dispatched exactly once: no lease had to expire, no coordinator raced.
    for task in &job.tasks {
        assert_eq!(
            task.attempts, 1,
            "task {} was dispatched {} times",
            task.index, task.attempts
        );
    }
}

/// A private Postgres server (initdb + pg_ctl as the `postgres` user) that a test may stop
/// and start without disturbing the shared one.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!("farm-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
        };
        pg.as_postgres(&format!("chown postgres {}", pg.dir.display()), true);
        pg.as_postgres(
            &format!(
                "{}/initdb -D {}/data -A trust -U postgres",
                pg.bin.display(),
                pg.dir.display()
            ),
            false,
        );
        pg.up();
        pg
    }

    fn as_postgres(&self, script: &str, as_root: bool) {
        let status = if as_root {
            Command::new("sh").args(["-c", script]).status()
        } else {
            Command::new("runuser")
                .args(["-u", "postgres", "--", "sh", "-c", script])
                .stdout(Stdio::null())
                .status()
        }
        .expect("run");
        assert!(status.success(), "{script}");
    }

    fn up(&self) {
        self.as_postgres(
            &format!(
                "{}/pg_ctl -D {d}/data -l {d}/log -w -o '-p {} -k {d} -h 127.0.0.1' start",
                self.bin.display(),
                self.port,
                d = self.dir.display()
            ),
            false,
        );
    }

    fn down(&self) {
        self.as_postgres(
            &format!(
                "{}/pg_ctl -D {}/data -m fast -w stop",
                self.bin.display(),
                self.dir.display()
            ),
            false,
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/farm", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c"])
            .arg(format!(
                "{}/pg_ctl -D {}/data -m immediate stop",
                self.bin.display(),
                self.dir.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_answers_unavailable_and_loses_nothing() {
    let pg = PrivatePostgres::start();
    let mut farm = Farm::new(0);
    // Move this farm onto the private Postgres.
    farm.kill_coordinator();
    farm.name_db_url = Some(pg.url());
    farm.token = String::new();
    farm.token = farm.create_token("e2e", true);
    farm.start_coordinator();
    farm.start_worker();
    let mut client = farm.client().await;
    let first = submit(&mut client, spec(&PROMPTS[..1], &[1, 2], 2), "")
        .await
        .job
        .expect("job")
        .id;

    pg.down();
    let refused = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec(&PROMPTS[..1], &[3], 2)),
            ..Default::default()
        })
        .await
        .expect_err("Postgres is down");
    assert_eq!(
        refused.code(),
        tonic::Code::Unavailable,
        "{}",
        refused.message()
    );

    pg.up();
    // The coordinator reconnects by itself; the job submitted before the outage finishes, and
    // the refused submit left nothing behind.
    let job = wait_done(&farm, &first, Duration::from_secs(120)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
    let jobs = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
}

/// A test CA and a certificate for localhost/127.0.0.1 it signed, made with openssl:
/// (ca.pem, cert.pem, key.pem) in `dir`.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    let script = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=farm-test-ca -keyout ca.key -out ca.pem \
         && openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out req.csr \
         && openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out cert.pem";
    let made = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_certs(dir.path());
    let port = free_port();
    let path = |p: &Path| p.display().to_string();
    let _redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tls-port",
                &port.to_string(),
            ])
            .args([
                "--tls-cert-file",
                &path(&cert),
                "--tls-key-file",
                &path(&key),
                "--tls-ca-cert-file",
                &path(&ca),
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--requirepass",
                "s3cret-redis",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_for_port(port, "redis-server (TLS)");
    let mut farm = Farm::new(0);
    farm.kill_coordinator();
    farm.env_overrides = vec![
        (
            "FARM_REDIS_URL".into(),
            format!("rediss://:s3cret-redis@localhost:{port}"),
        ),
        ("FARM_REDIS_CA".into(), path(&ca)),
    ];
    farm.start_coordinator();
    farm.start_worker();
    let mut client = farm.client().await;
    let id = submit(&mut client, spec(&PROMPTS[..1], &[1], 2), "")
        .await
        .job
        .expect("job")
        .id;
    let job = wait_done(&farm, &id, Duration::from_secs(120)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32, "{job:?}");
}

/// (request line, body) of each request an [`http_recorder`] received.
type Recorded = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Accepts HTTP requests on a free port and keeps (request line, body) of each, answering 200.
fn http_recorder() -> (u16, Recorded) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut data = Vec::new();
            let mut buf = [0u8; 8192];
            // Headers, then as many body bytes as Content-Length says.
            let (head_end, length) = loop {
                let Ok(n) = stream.read(&mut buf) else {
                    break (None, 0);
                };
                if n == 0 {
                    break (None, 0);
                }
                data.extend_from_slice(&buf[..n]);
                if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (Some(end + 4), length);
                }
            };
            let Some(start) = head_end else { continue };
            while data.len() < start + length {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&data[..start])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            if let Ok(mut seen) = keep.lock() {
                seen.push((line, data[start..].to_vec()));
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_spans_are_exported_over_otlp() {
    let (port, seen) = http_recorder();
    let mut farm = Farm::new(0);
    farm.env_overrides = vec![(
        "FARM_OTLP_ENDPOINT".into(),
        format!("http://127.0.0.1:{port}"),
    )];
    farm.start_worker();
    let mut client = farm.client().await;
    let id = submit(&mut client, spec(&PROMPTS[..1], &[4], 2), "")
        .await
        .job
        .expect("job")
        .id;
    let job = wait_done(&farm, &id, Duration::from_secs(120)).await;
    assert_eq!(job.status, pb::JobStatus::Succeeded as i32);
    // A graceful stop flushes the spans still batched.
    let mut worker = farm.workers.remove(0);
    let pid = worker.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let _ = tokio::task::spawn_blocking(move || worker.0.wait()).await;
    let seen = seen.lock().expect("recorder").clone();
    let traces: Vec<&Vec<u8>> = seen
        .iter()
        .filter(|(line, _)| line.starts_with("POST /v1/traces"))
        .map(|(_, b)| b)
        .collect();
    assert!(
        !traces.is_empty(),
        "no OTLP export: {:?}",
        seen.iter().map(|(l, _)| l).collect::<Vec<_>>()
    );
    let contains = |needle: &[u8]| {
        traces
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle))
    };
    assert!(contains(b"task"), "no task span");
    assert!(contains(id.as_bytes()), "no span carries the job id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_stays_on_the_worker_that_holds_it() {
    let mut farm = Farm::new(0);
    let size = farm.add_tiny_model("tiny-b", 1);
    assert_eq!(size, weight_bytes(&farm.models.path().join("tiny")));
    // Each worker's cache holds one model, not two.
    let cache = (size + size / 2).to_string();
    let flags = ["--model-cache-bytes", cache.as_str()];
    let mut client = farm.client().await;
    let job = |model: &str, seeds: &[u64]| pb::JobSpec {
        model: model.into(),
        ..spec(&PROMPTS[..1], seeds, 2)
    };

    // Warm-up: worker 0 loads tiny; then worker 1 arrives and takes tiny-b, which no worker
    // holds and only worker 1 has cache room for.
    let w0 = farm.start_worker_with(&flags);
    let id = submit(&mut client, job("tiny", &[1, 2]), "")
        .await
        .job
        .expect("job")
        .id;
    wait_done(&farm, &id, Duration::from_secs(120)).await;
    farm.wait_worker(&w0, "reports tiny loaded", |w| w.models == ["tiny"])
        .await;
    let w1 = farm.start_worker_with(&flags);
    farm.wait_worker(&w1, "online", |w| w.online).await;
    let id = submit(&mut client, job("tiny-b", &[1, 2]), "")
        .await
        .job
        .expect("job")
        .id;
    let done = wait_done(&farm, &id, Duration::from_secs(120)).await;
    assert!(
        done.tasks.iter().all(|t| t.worker == w1),
        "{:?}",
        done.tasks
    );
    farm.wait_worker(&w1, "reports tiny-b loaded", |w| w.models == ["tiny-b"])
        .await;

    // Steady state: jobs of both models, interleaved. Each goes to its model's worker and no
    // worker loads a model again.
    let mut ids = Vec::new();
    for round in 0..3u64 {
        for model in ["tiny", "tiny-b"] {
            let seeds = [10 + round, 20 + round];
            ids.push((
                model,
                submit(&mut client, job(model, &seeds), "")
                    .await
                    .job
                    .expect("job")
                    .id,
            ));
        }
    }
    let mut ended = 0;
    for (model, id) in &ids {
        let done = wait_done(&farm, id, Duration::from_secs(180)).await;
        ended = ended.max(done.finished_at_ms);
        assert_eq!(done.status, pb::JobStatus::Succeeded as i32, "{done:?}");
        let expected = if *model == "tiny" { &w0 } else { &w1 };
        for task in &done.tasks {
            assert_eq!(
                &task.worker, expected,
                "{model} task {} ran elsewhere",
                task.index
            );
        }
    }
    for (id, done) in [(&w0, 2 + 6), (&w1, 2 + 6)] {
        // A heartbeat sent after the last job ended.
        let w = farm
            .wait_worker(id, "reports its tasks", |w| {
                w.tasks_done == done && w.last_seen_ms > ended
            })
            .await;
        assert_eq!((w.model_loads, w.model_evictions), (1, 0), "{w:?}");
        assert_eq!(w.cache_capacity_bytes, size + size / 2);
        assert_eq!(w.cache_used_bytes, size);
    }
    // The same figure on /metrics.
    let metrics = http_get(farm.http_port, "/metrics");
    for id in [&w0, &w1] {
        let line = format!("farm_worker_model_loads{{worker=\"{id}\"}} 1");
        assert!(metrics.contains(&line), "no `{line}` in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_filters_route_tasks_and_refuse_what_no_worker_takes() {
    let mut farm = Farm::new(0);
    let small = farm.start_worker_with(&["--max-pixels", "4096", "--modes", "txt2img"]);
    let w = farm
        .wait_worker(&small, "online", |w| w.online && w.max_pixels == 4096)
        .await;
    assert_eq!(w.modes, ["txt2img"]);
    let mut client = farm.client().await;
    let wide = pb::JobSpec {
        width: 128,
        ..spec(&PROMPTS[..1], &[1, 2], 2)
    };
    // Only a 64x64 worker is online: a 128x64 job is refused, with what to change.
    let refused = client
        .submit_job(pb::SubmitJobRequest {
            spec: Some(wide.clone()),
            ..Default::default()
        })
        .await
        .expect_err("no worker takes 128x64");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("max of 4096") && refused.message().contains("--max-pixels"),
        "{}",
        refused.message()
    );
    // With a worker without limits online, the wide job runs there and only there.
    let big = farm.start_worker_with(&[]);
    farm.wait_worker(&big, "online", |w| w.online).await;
    let id = submit(&mut client, wide, "").await.job.expect("job").id;
    let done = wait_done(&farm, &id, Duration::from_secs(120)).await;
    assert_eq!(done.status, pb::JobStatus::Succeeded as i32, "{done:?}");
    assert!(
        done.tasks.iter().all(|t| t.worker == big),
        "{:?}",
        done.tasks
    );
}

/// A plain HTTP GET on 127.0.0.1; the response body.
fn http_get(port: u16, path: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("response");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_tasks_render_the_same_images_as_one_at_a_time() {
    let mut farm = Farm::new(0);
    let batcher = farm.start_worker_with(&["--max-batch", "4"]);
    farm.wait_worker(&batcher, "online", |w| w.online && w.max_batch == 4)
        .await;
    let mut client = farm.client().await;
    let seeds = [5, 6, 7];
    let job = spec(&PROMPTS[..2], &seeds, 3);
    let id = submit(&mut client, job.clone(), "")
        .await
        .job
        .expect("job")
        .id;
    let batched = wait_done(&farm, &id, Duration::from_secs(180)).await;
    assert_eq!(
        batched.status,
        pb::JobStatus::Succeeded as i32,
        "{batched:?}"
    );
    // A heartbeat sent after the job ended counts every render call.
    let w = farm
        .wait_worker(&batcher, "reports its tasks", |w| {
            w.tasks_done == 6 && w.last_seen_ms > batched.finished_at_ms
        })
        .await;
    assert!(
        w.batches <= 3,
        "6 tasks with --max-batch 4 took {} render calls",
        w.batches
    );

    // The same job on a worker that renders one task at a time. The batcher leaves with
    // SIGTERM, so nothing is placed on it any more.
    let mut leaving = farm.workers.remove(0);
    let pid = leaving.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    tokio::task::spawn_blocking(move || leaving.0.wait().expect("wait"))
        .await
        .expect("join");
    let single = farm.start_worker_with(&[]);
    farm.wait_worker(&single, "online", |w| w.online).await;
    let id = submit(&mut client, job, "").await.job.expect("job").id;
    let alone = wait_done(&farm, &id, Duration::from_secs(180)).await;
    let w = farm
        .wait_worker(&single, "reports its tasks", |w| {
            w.tasks_done == 6 && w.last_seen_ms > alone.finished_at_ms
        })
        .await;
    assert_eq!(w.batches, 6);
    let s3 = farm.s3.store();
    for (b, a) in batched.tasks.iter().zip(&alone.tasks) {
        assert_eq!((b.index, b.seed), (a.index, a.seed));
        let (pb_, pa) = (
            object(&*s3, &b.object_key).await,
            object(&*s3, &a.object_key).await,
        );
        let (ib, ia) = (
            image::load_from_memory(&pb_).expect("png").to_rgb8(),
            image::load_from_memory(&pa).expect("png").to_rgb8(),
        );
        let worst = ib
            .as_raw()
            .iter()
            .zip(ia.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        assert!(
            worst <= 1,
            "task {}: batched image differs by {worst} levels",
            b.index
        );
    }
}
