//! `farm bench`: figures for BENCHMARKS.md (not timed tests).
//!
//! * `orchestration`: the farm's own cost per task through real Postgres, Redis and storage,
//!   with workers on the benchmark-only `null` pipeline, against the raw Redis Streams round
//!   trip as the ceiling.
//! * `unet`: one evaluation of the full-size SD 1.5 UNet (random weights) on candle.
//! * `batch`: images/s of the tiny model against the batch size.
//! * `memory`: a worker's resident memory with a full-size SD 1.5 model loaded.

mod batch;
mod memory;
mod orchestration;
mod unet;

use clap::Subcommand;

use crate::Settings;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tasks/s end to end and submit→start latency with null-pipeline workers, against the
    /// raw Redis Streams round trip (XADD → XREADGROUP → XACK).
    Orchestration(orchestration::OrchestrationArgs),
    /// One UNet evaluation of the full-size SD 1.5 architecture (random weights).
    Unet(unet::UnetArgs),
    /// Images/s against the batch size on the tiny model.
    Batch(batch::BatchArgs),
    /// A worker's resident memory with a full-size SD 1.5 model (random weights) loaded.
    Memory(memory::MemoryArgs),
}

pub async fn run(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Orchestration(args) => orchestration::run(settings, args).await,
        BenchCommand::Unet(args) => tokio::task::spawn_blocking(move || unet::run(args)).await?,
        BenchCommand::Batch(args) => tokio::task::spawn_blocking(move || batch::run(args)).await?,
        BenchCommand::Memory(args) => {
            tokio::task::spawn_blocking(move || memory::run(args)).await?
        }
    }
}

/// The process's peak resident set (`VmHWM`), in MiB; 0 where /proc is missing.
pub(crate) fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// The process's current resident set (`VmRSS`), in MiB; 0 where /proc is missing.
pub(crate) fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A size line (in kB) of `/proc/self/status`, in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Rounds to `digits` decimals (for readable JSON).
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
