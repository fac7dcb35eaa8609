//! The deployment files use only flags and `FARM_*` variables the `farm` binary really has:
//! every `args:`/`command:` list in deploy/ is checked against `farm <subcommand> --help`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const FARM: &str = env!("CARGO_BIN_EXE_farm");
/// The subcommands a deployment runs.
const FARM_SERVICES: &[&str] = &["coordinator", "worker", "dev"];

fn help(args: &[&str]) -> String {
    let out = Command::new(FARM)
        .args(args)
        .arg("--help")
        .output()
        .expect("farm --help");
    assert!(out.status.success(), "farm {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The quoted items of a flow-style list: `args: ["worker", "--concurrency", "1"]`.
fn quoted(list: &str) -> Vec<String> {
    list.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn deploy_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut files = vec![root.join("compose.yaml")];
    for entry in std::fs::read_dir(root.join("kubernetes")).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).expect("read manifest"),
            )
        })
        .collect()
}

#[test]
fn manifests_use_only_real_flags_and_variables() {
    let files = deploy_files();
    assert!(files.iter().any(|(p, _)| p.ends_with("worker.yaml")));
    let mut checked = 0;
    let mut variables = BTreeSet::new();
    for (path, text) in &files {
        for line in text.lines() {
            let line = line.trim();
            if let Some(list) = line
                .strip_prefix("args:")
                .or_else(|| line.strip_prefix("command:"))
            {
                let items = quoted(list);
                // Lists of other programs (postgres, redis, minio) are not ours to check.
                let Some(sub) = items
                    .first()
                    .filter(|s| FARM_SERVICES.contains(&s.as_str()))
                else {
                    continue;
                };
                let text = help(&[sub.as_str()]);
                for flag in items.iter().filter(|i| i.starts_with("--")) {
                    let flag = flag.split('=').next().unwrap_or(flag);
                    assert!(
                        text.contains(flag),
                        "{path}: `farm {sub}` has no flag {flag}"
                    );
                    checked += 1;
                }
            }
            for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("FARM_") {
                    variables.insert(word.to_string());
                }
            }
        }
    }
    assert!(
        checked >= 8,
        "only {checked} flags found: is the list format still flow-style?"
    );
    let all_help: String = [&[][..], &["coordinator"], &["worker"], &["submit"]]
        .iter()
        .map(|a| help(a))
        .collect();
    for var in &variables {
        assert!(
            all_help.contains(&format!("env: {var}")),
            "no setting reads {var}"
        );
    }
    assert!(variables.contains("FARM_DATABASE_URL") && variables.contains("FARM_WORKER_ID"));
}

#[test]
fn workers_request_a_gpu_and_keda_scales_them_on_the_dispatch_lag() {
    let files = deploy_files();
    let text = |name: &str| {
        files
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("deploy/kubernetes/{name} missing"))
    };
    assert!(text("worker.yaml").contains("nvidia.com/gpu: 1"));
    let keda = text("keda.yaml");
    assert!(keda.contains("kind: ScaledObject") && keda.contains("minReplicaCount: 0"));
    // The lag: tasks not yet started, counted where they wait (a real column and states).
    assert!(keda.contains("type: postgresql") && keda.contains("key: FARM_DATABASE_URL"));
    let migrations = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/0001_init.sql"),
    )
    .expect("migrations");
    assert!(keda.contains("FROM tasks WHERE status IN ('pending', 'queued')"));
    assert!(
        migrations.contains("CREATE TABLE tasks") && migrations.contains("'pending', 'queued'")
    );
    assert!(text("coordinator.yaml").contains("path: /readyz"));
}
