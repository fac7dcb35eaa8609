//! The dashboard in a real browser, webhooks, metrics and health: a real coordinator and worker
//! (the `farm` binary) against the real Postgres and Redis, with file storage.
//!
//! `dashboard_in_headless_chromium` runs tests/dashboard/dashboard.test.mjs (Playwright's
//! `playwright-core` driving Debian's /usr/bin/chromium); `.ci/run` installs both. It saves
//! screenshots under `$CARGO_TARGET_DIR/dashboard-screenshots` (or $FARM_SCREENSHOT_DIR).
//!
//! Each test gets its own database, Redis key prefix and storage folder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[path = "support/mod.rs"]
mod support;
use support::{free_port, wait_for_port, Proc};

const FARM: &str = env!("CARGO_BIN_EXE_farm");
const WEBHOOK_SECRET: &str = "dashboard-test-secret";

/// A farm of its own: database, Redis prefix, storage folder, models, coordinator, workers.
struct Farm {
    name: String,
    dir: tempfile::TempDir,
    grpc_port: u16,
    http_port: u16,
    procs: Vec<Proc>,
    /// An admin token of tenant `ops`.
    token: String,
}

impl Farm {
    fn new(workers: usize) -> Farm {
        let mut farm = Farm {
            name: format!(
                "farm_dash_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            dir: tempfile::tempdir().expect("tempdir"),
            grpc_port: free_port(),
            http_port: free_port(),
            procs: Vec::new(),
            token: String::new(),
        };
        let tiny = farm.dir.path().join("models/tiny");
        let out = farm.farm(&["model", "init-tiny", &tiny.display().to_string()]);
        assert!(out.status.success(), "init-tiny: {}", stderr(&out));
        // A model folder that cannot load: its tasks fail (for Retry failed).
        let broken = farm.dir.path().join("models/broken");
        std::fs::create_dir_all(&broken).expect("mkdir");
        std::fs::write(broken.join("model_index.json"), "{}").expect("write");
        farm.token = farm.create_token("ops", true);
        let coordinator = farm
            .command()
            .args([
                "coordinator",
                "--grpc-addr",
                &format!("127.0.0.1:{}", farm.grpc_port),
                "--http-addr",
                &format!("127.0.0.1:{}", farm.http_port),
            ])
            .env("FARM_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .stdout(Stdio::null())
            .spawn()
            .expect("start coordinator");
        farm.procs.push(Proc(coordinator));
        wait_for_port(farm.grpc_port, "coordinator");
        wait_for_port(farm.http_port, "coordinator http");
        for i in 0..workers {
            let worker = farm
                .command()
                .args(["worker", "--concurrency", "1", "--id", &format!("gpu-{i}")])
                .stdout(Stdio::null())
                .spawn()
                .expect("start worker");
            farm.procs.push(Proc(worker));
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
        .env("FARM_STORAGE", self.dir.path().join("objects"))
        .env("FARM_MODELS", self.dir.path().join("models"))
        .env(
            "FARM_COORDINATOR",
            format!("http://127.0.0.1:{}", self.grpc_port),
        )
        .env("RUST_LOG", "warn");
        if !self.token.is_empty() {
            cmd.env("FARM_TOKEN", &self.token);
        }
        cmd
    }

    fn farm(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run farm")
    }

    fn create_token(&self, tenant: &str, admin: bool) -> String {
        let mut args = vec!["token", "create", "--tenant", tenant];
        if admin {
            args.push("--admin");
        }
        let out = self.farm(&args);
        assert!(out.status.success(), "token create: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `farm submit ARGS...` as `token`'s tenant; the job id.
    fn submit(&self, token: &str, args: &[&str]) -> String {
        let out = self
            .command()
            .env("FARM_TOKEN", token)
            .arg("submit")
            .args(args)
            .output()
            .expect("run farm submit");
        assert!(out.status.success(), "submit: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http_get(self.http_port, path, token)
    }

    /// Waits until `n` workers are online (as the dashboard's overview says).
    fn wait_workers_online(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get("/api/overview", Some(&self.token));
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).expect("overview json");
                if v["workers_online"].as_u64().unwrap_or(0) >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "workers never came online");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_job(&self, id: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = self.get(&format!("/api/jobs/{id}"), Some(&self.token));
            assert_eq!(status, 200, "{body}");
            let job: serde_json::Value = serde_json::from_str(&body).expect("job json");
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not end: {job}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.procs.clear();
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A plain HTTP/1.1 GET; (status, body).
fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.into() })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn screenshot_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FARM_SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    target.join("dashboard-screenshots")
}

#[test]
fn dashboard_in_headless_chromium() {
    let chromium = std::env::var("FARM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let script_dir = repo_root().join("tests/dashboard");
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (or run .ci/run)"
    );
    assert!(
        script_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: `npm ci` in tests/dashboard (or run .ci/run)"
    );
    let farm = Farm::new(1);
    farm.wait_workers_online(1);
    let tenant_token = farm.create_token("acme", false);
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).expect("screenshot dir");

    // The farm's environment (for `farm submit`), plus what the script needs.
    let mut base = farm.command();
    base.env("FARM_BIN", FARM)
        .env("FARM_URL", format!("http://127.0.0.1:{}", farm.http_port))
        .env("FARM_ADMIN_TOKEN", &farm.token)
        .env("FARM_TENANT_TOKEN", &tenant_token)
        .env("FARM_CHROMIUM", &chromium)
        .env("FARM_SCREENSHOT_DIR", &shots);
    let envs: Vec<_> = base
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let mut cmd = Command::new("node");
    cmd.current_dir(&script_dir)
        .arg("dashboard.test.mjs")
        .envs(envs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run node (is Node.js installed?)");
    // Echo the script's lines as they come, so a hang shows where it is.
    let out = child.stdout.take().expect("stdout");
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("[browser] {line}");
        }
    });
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().expect("node");
    let _ = echo.join();
    assert!(status.success(), "the browser test failed: {err}");
    for shot in ["overview.png", "jobs.png", "job.png", "workers.png"] {
        let path = shots.join(shot);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 1000,
            "screenshot {} missing or empty",
            path.display()
        );
    }
    println!("screenshots in {}", shots.display());
}

/// One recorded webhook call.
#[derive(Debug, Clone)]
struct Call {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Call {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A local HTTP listener that answers the first `fail_first` calls with 500, then 200.
fn webhook_listener(fail_first: usize) -> (u16, Arc<Mutex<Vec<Call>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn);
            let mut headers = Vec::new();
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let n = {
                let mut calls = seen.lock().expect("calls");
                calls.push(Call { headers, body });
                calls.len()
            };
            let status = if n <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let mut conn = reader.into_inner();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, calls)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn webhook_metrics_health_and_tenants() {
    let farm = Farm::new(1);
    assert_eq!(farm.get("/healthz", None), (200, "ok\n".into()));
    let (status, body) = farm.get("/readyz", None);
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    farm.wait_workers_online(1);

    // A bad URL is refused before anything is written.
    let out = farm
        .command()
        .args(["submit", "--prompt", "x", "--webhook-url", "ftp://nope"])
        .output()
        .expect("farm submit");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("webhook_url"), "{}", stderr(&out));

    // The webhook answers 500 once, then 200: one retry, then delivered.
    let (port, calls) = webhook_listener(1);
    let url = format!("http://127.0.0.1:{port}/hooks/farm");
    let id = farm.submit(
        &farm.token,
        &[
            "--prompt",
            "a lighthouse",
            "--seeds",
            "1,2",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--webhook-url",
            &url,
        ],
    );
    let job = farm.wait_job(&id, Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["spec"]["webhook_url"], url.as_str());

    let deadline = Instant::now() + Duration::from_secs(30);
    while calls.lock().expect("calls").len() < 2 {
        assert!(Instant::now() < deadline, "the webhook was not retried");
        std::thread::sleep(Duration::from_millis(100));
    }
    let calls = calls.lock().expect("calls").clone();
    let delivery = calls[0].header("x-farm-delivery").expect("delivery id");
    for call in &calls {
        assert_eq!(call.header("x-farm-event"), Some("job.finished"));
        assert_eq!(call.header("content-type"), Some("application/json"));
        assert_eq!(call.header("x-farm-delivery"), Some(delivery));
        let ts = call.header("x-farm-timestamp").expect("timestamp");
        let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("key");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&call.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(call.header("x-farm-signature"), Some(expected.as_str()));
        let body: serde_json::Value = serde_json::from_slice(&call.body).expect("json body");
        assert_eq!(body["event"], "job.finished");
        assert_eq!(body["job"]["id"], id.as_str());
        assert_eq!(body["job"]["status"], "succeeded");
        assert_eq!(body["job"]["tasks"].as_array().map(Vec::len), Some(2));
        assert!(body["job"]["tasks"][0]["sha256"].is_string());
    }
    // The job page shows the delivery.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = farm.get(&format!("/api/jobs/{id}"), Some(&farm.token));
        let job: serde_json::Value = serde_json::from_str(&body).expect("json");
        if job["webhooks"][0]["status"] == "delivered" {
            assert_eq!(job["webhooks"][0]["attempts"], 2);
            break;
        }
        assert!(Instant::now() < deadline, "delivery not recorded: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Only once: no more calls after the delivery.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(calls.len(), 2);

    // Metrics: gauges from the database, histograms and counters from the loops.
    let (status, text) = farm.get("/metrics", None);
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "farm_tasks{state=\"succeeded\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(metric(&text, "farm_workers_online"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "farm_task_render_seconds_count"),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(&text, "farm_upload_bytes_total").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "farm_webhook_deliveries_total{outcome=\"delivered\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "farm_webhook_deliveries_total{outcome=\"retry\"}"),
        Some(1.0),
        "{text}"
    );
    for name in [
        "farm_queue_depth",
        "farm_step_duration_seconds_bucket",
        "farm_model_load_seconds_bucket",
        "farm_task_retries_total",
        "farm_dead_letters_total",
        "farm_task_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }

    // Every metric the Grafana dashboard charts exists.
    let grafana = std::fs::read_to_string(repo_root().join("deploy/grafana/farm.json"))
        .expect("deploy/grafana/farm.json");
    let names: std::collections::BTreeSet<&str> = grafana
        .match_indices("farm_")
        .map(|(i, _)| {
            let rest = &grafana[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| n.len() > "farm_".len() && *n != "farm_overview")
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "the Grafana dashboard charts {name}, which /metrics lacks"
        );
    }

    // Tenants: another tenant sees neither the job nor its image; no token, nothing.
    let acme = farm.create_token("acme", false);
    assert_eq!(farm.get(&format!("/api/jobs/{id}"), Some(&acme)).0, 404);
    assert_eq!(
        farm.get(&format!("/api/jobs/{id}/tasks/0/image"), Some(&acme))
            .0,
        404
    );
    let (status, body) = farm.get("/api/jobs", Some(&acme));
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(farm.get("/api/jobs", None).0, 401);
    assert_eq!(farm.get("/api/jobs", Some("farm_not_a_token")).0, 401);
    let (status, body) = farm.get(&format!("/api/jobs/{id}/tasks/1/image"), Some(&farm.token));
    assert_eq!(status, 200);
    assert!(body.starts_with("\u{FFFD}PNG"), "not a PNG");
    let own = farm.submit(
        &acme,
        &[
            "--prompt", "mine", "--seeds", "5", "--steps", "2", "--width", "64", "--height", "64",
        ],
    );
    let (_, body) = farm.get("/api/overview", Some(&acme));
    let overview: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(overview["tenant"], "acme");
    farm.wait_job(&own, Duration::from_secs(60));
    let (_, body) = farm.get("/api/jobs", Some(&acme));
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(list["jobs"][0]["id"], own.as_str());
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(1));
}
