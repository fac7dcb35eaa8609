//! What client commands print: the job JSON (a contract) and aligned tables.

use farm_proto::v1 as pb;
use serde::Serialize;

pub fn job_status_name(status: i32) -> &'static str {
    match pb::JobStatus::try_from(status) {
        Ok(pb::JobStatus::Pending) => "pending",
        Ok(pb::JobStatus::Running) => "running",
        Ok(pb::JobStatus::Succeeded) => "succeeded",
        Ok(pb::JobStatus::Failed) => "failed",
        Ok(pb::JobStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn task_status_name(status: i32) -> &'static str {
    match pb::TaskStatus::try_from(status) {
        Ok(pb::TaskStatus::Pending) => "pending",
        Ok(pb::TaskStatus::Queued) => "queued",
        Ok(pb::TaskStatus::Running) => "running",
        Ok(pb::TaskStatus::Succeeded) => "succeeded",
        Ok(pb::TaskStatus::Failed) => "failed",
        Ok(pb::TaskStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn is_terminal(status: i32) -> bool {
    matches!(
        job_status_name(status),
        "succeeded" | "failed" | "cancelled"
    )
}

#[derive(Serialize)]
pub struct TaskJson<'a> {
    pub index: u32,
    pub seed: u64,
    pub prompt: &'a str,
    pub status: &'static str,
    pub object_key: Option<&'a str>,
    pub sha256: Option<&'a str>,
    pub attempts: u32,
    pub error: Option<&'a str>,
}

#[derive(Serialize)]
pub struct JobJson<'a> {
    pub id: &'a str,
    pub status: &'static str,
    pub model: &'a str,
    pub tasks_total: u32,
    pub tasks_succeeded: u32,
    pub tasks_failed: u32,
    pub tasks_cancelled: u32,
    pub tasks: Vec<TaskJson<'a>>,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

pub fn job_json(job: &pb::Job) -> serde_json::Value {
    let view = JobJson {
        id: &job.id,
        status: job_status_name(job.status),
        model: job
            .spec
            .as_ref()
            .map(|s| s.model.as_str())
            .unwrap_or_default(),
        tasks_total: job.tasks_total,
        tasks_succeeded: job.tasks_succeeded,
        tasks_failed: job.tasks_failed,
        tasks_cancelled: job.tasks_cancelled,
        tasks: job
            .tasks
            .iter()
            .map(|t| TaskJson {
                index: t.index,
                seed: t.seed,
                prompt: &t.prompt,
                status: task_status_name(t.status),
                object_key: non_empty(&t.object_key),
                sha256: non_empty(&t.sha256),
                attempts: t.attempts,
                error: non_empty(&t.error),
            })
            .collect(),
    };
    serde_json::to_value(view).unwrap_or(serde_json::Value::Null)
}

/// Prints rows as columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn print_job(job: &pb::Job) {
    let spec = job.spec.clone().unwrap_or_default();
    println!("job       {}", job.id);
    println!("status    {}", job_status_name(job.status));
    println!(
        "model     {}  {}x{}  {} steps  guidance {}  {}",
        spec.model,
        spec.width,
        spec.height,
        spec.steps,
        spec.guidance_scale.unwrap_or_default(),
        spec.scheduler
    );
    println!(
        "tasks     {} total, {} succeeded, {} failed, {} cancelled",
        job.tasks_total, job.tasks_succeeded, job.tasks_failed, job.tasks_cancelled
    );
    if job.tasks.is_empty() {
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = job
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.index.to_string(),
                t.seed.to_string(),
                task_status_name(t.status).to_string(),
                t.attempts.to_string(),
                if t.object_key.is_empty() {
                    t.error.clone()
                } else {
                    t.object_key.clone()
                },
            ]
        })
        .collect();
    print_table(
        &["INDEX", "SEED", "STATUS", "ATTEMPTS", "OBJECT / ERROR"],
        &rows,
    );
}
