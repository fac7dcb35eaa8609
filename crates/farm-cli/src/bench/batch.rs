//! `farm bench batch`: images/s of the tiny random model against the batch size, the way a
//! worker with `--max-batch B` renders: `StableDiffusion::generate_batch` over B tasks with
//! their own prompts and seeds.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use farm_diffusion::{BatchItem, DType, Device, Request, StableDiffusion};
use serde::Serialize;

use super::{peak_rss_mib, round};

#[derive(Args, Clone, Debug)]
pub struct BatchArgs {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub sizes: Vec<usize>,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub side: usize,
    /// Timed generate calls per batch size, after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct BatchRow {
    pub batch: usize,
    pub images_per_s: f64,
    pub seconds_per_call: f64,
    pub speedup_vs_1: f64,
}

#[derive(Debug, Serialize)]
pub struct BatchReport {
    pub model: &'static str,
    pub steps: usize,
    pub side: usize,
    pub runs: usize,
    pub rows: Vec<BatchRow>,
    pub peak_rss_mib: f64,
}

pub fn run(args: BatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let device: Device = farm_diffusion::parse_device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let dir =
        std::env::temp_dir().join(format!("farm-bench-tiny-{}", uuid::Uuid::new_v4().simple()));
    farm_diffusion::init_tiny(&dir, 0).context("cannot write the tiny model")?;
    let model = StableDiffusion::load(&dir, &device, DType::F32);
    let _ = std::fs::remove_dir_all(&dir);
    let model = model?;
    let mut rows: Vec<BatchRow> = Vec::new();
    for &batch in &args.sizes {
        anyhow::ensure!(batch >= 1, "--sizes: batch sizes start at 1");
        let request = Request {
            width: args.side,
            height: args.side,
            steps: args.steps,
            guidance_scale: 7.5,
            ..Default::default()
        };
        // B tasks as a worker would batch them: each its own prompt and seed.
        let items: Vec<BatchItem> = (0..batch)
            .map(|i| BatchItem {
                prompt: format!("a benchmark of batches, task {i}"),
                negative_prompt: "blurry".into(),
                seed: 1 + i as u64,
            })
            .collect();
        let go = || -> anyhow::Result<()> {
            let images = model.generate_batch(&request, &items, &mut |_, _| true)?;
            anyhow::ensure!(
                images.len() == batch,
                "generate returned {} images",
                images.len()
            );
            Ok(())
        };
        go()?;
        let t = Instant::now();
        for _ in 0..args.runs {
            go()?;
        }
        let secs = t.elapsed().as_secs_f64();
        let ips = (batch * args.runs) as f64 / secs;
        let base = rows.first().map(|r| r.images_per_s).unwrap_or(ips);
        rows.push(BatchRow {
            batch,
            images_per_s: round(ips, 2),
            seconds_per_call: round(secs / args.runs as f64, 4),
            speedup_vs_1: round(ips / base, 2),
        });
    }
    let report = BatchReport {
        model: "tiny (farm_diffusion::init_tiny, seed 0)",
        steps: args.steps,
        side: args.side,
        runs: args.runs,
        rows,
        peak_rss_mib: round(peak_rss_mib(), 1),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "tiny model, {}x{} px, {} steps, {} timed calls per size",
            report.side, report.side, report.steps, report.runs
        );
        println!("batch  images/s  s/call   speedup");
        for r in &report.rows {
            println!(
                "{:>5}  {:>8.2}  {:>6.4}  {:>6.2}x",
                r.batch, r.images_per_s, r.seconds_per_call, r.speedup_vs_1
            );
        }
    }
    Ok(())
}
