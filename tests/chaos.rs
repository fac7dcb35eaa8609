//! The chaos suite: `farm chaos` runs a 300-task job on the tiny model with 3 worker processes
//! while it SIGKILLs and restarts a worker every few seconds, restarts Redis empty once and
//! kills and restarts the coordinator once; then it checks every task in Postgres against its
//! object. Needs Postgres on 127.0.0.1:5432 and `redis-server` on PATH.

use std::process::Command;

#[test]
fn nothing_is_lost_when_workers_redis_and_the_coordinator_die() {
    let out = Command::new(env!("CARGO_BIN_EXE_farm"))
        .args([
            "chaos",
            "--tasks",
            "300",
            "--workers",
            "3",
            "--duration",
            "20",
            "--kill-every",
            "3",
            "--json",
        ])
        .env(
            "FARM_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/farm",
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("run farm chaos");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "farm chaos failed:\n{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["tasks"], 300, "{report}");
    assert_eq!(report["succeeded"], 300, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert!(
        report["worker_kills"].as_u64().is_some_and(|k| k >= 3),
        "{report}"
    );
    assert_eq!(report["redis_restarts"], 1, "{report}");
    assert_eq!(report["coordinator_restarts"], 1, "{report}");
    // Attempts are recorded: at least one per task, more where a kill or Redis took one.
    assert!(
        report["attempts_total"].as_u64().is_some_and(|a| a >= 300),
        "{report}"
    );
}
