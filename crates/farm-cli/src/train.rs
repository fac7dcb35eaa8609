//! `farm train`: fine-tune a model's UNet locally on a folder of image–caption pairs.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use farm_diffusion::train::{checkpoint_dir, AdamWConfig, TrainConfig, Trainer};

/// The environment variable choosing the training device (`cpu`, `cuda`, `cuda:N`).
const DEVICE_ENV: &str = "FARM_TRAIN_DEVICE";

/// Fine-tune the UNet (frozen VAE and text encoder) on images with captions: a folder of
/// images with same-named .txt files, or a metadata.jsonl with file_name and text. Writes
/// OUTPUT/checkpoint-N/ every --checkpoint-every steps and the fine-tuned model (diffusers
/// layout) into OUTPUT. The device is taken from FARM_TRAIN_DEVICE (default cpu).
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Base model folder (diffusers layout), or a model name under FARM_MODELS.
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints and, at the end, the fine-tuned model.
    #[arg(long)]
    pub output: PathBuf,
    /// Total optimizer steps (including those of a resumed checkpoint).
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// AdamW learning rate (betas 0.9/0.999, eps 1e-8, weight decay 1e-2).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Square training size in pixels, a multiple of 8 [default: the model's, 512 for SD 1.5].
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Write OUTPUT/checkpoint-N every K steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Continue from this checkpoint folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Append {"step": n, "loss": x} per step to this JSON-lines file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Seed of the data order, timesteps and noise (a resumed checkpoint keeps its own).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn model_dir(model: &Path, models: &Path) -> anyhow::Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let named = models.join(model);
    if model.components().count() == 1 && named.is_dir() {
        return Ok(named);
    }
    bail!(
        "model folder {} does not exist (nor {})",
        model.display(),
        named.display()
    )
}

pub async fn run(args: TrainArgs, models: PathBuf) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping after this step");
            flag.store(true, Ordering::SeqCst);
        }
    });
    let result = tokio::task::spawn_blocking(move || train_blocking(args, &models, &stop))
        .await
        .context("the training thread panicked")?;
    ctrl_c.abort();
    result
}

fn train_blocking(args: TrainArgs, models: &Path, stop: &AtomicBool) -> anyhow::Result<()> {
    if args.steps == 0 {
        bail!("--steps must be positive");
    }
    if args.checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be positive");
    }
    let model = model_dir(&args.model, models)?;
    if let (Ok(a), Ok(b)) = (model.canonicalize(), args.output.canonicalize()) {
        if a == b {
            bail!("--output must not be the base model's folder");
        }
    }
    if args.resume.is_none() && args.output.join("model_index.json").exists() {
        bail!(
            "{} already holds a model; choose another --output or remove it",
            args.output.display()
        );
    }
    let device_name = std::env::var(DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    let device = farm_diffusion::parse_device(&device_name)?;
    let cfg = TrainConfig {
        model: model.clone(),
        data: args.data.clone(),
        batch_size: args.batch_size,
        resolution: args.resolution,
        seed: args.seed,
        adamw: AdamWConfig {
            lr: args.lr,
            ..Default::default()
        },
    };
    let mut trainer = Trainer::new(&cfg, &device)
        .with_context(|| format!("cannot set up training of {}", model.display()))?;
    if let Some(ckpt) = &args.resume {
        trainer
            .resume(ckpt)
            .with_context(|| format!("cannot resume from {}", ckpt.display()))?;
        eprintln!(
            "resumed from {} at step {}",
            ckpt.display(),
            trainer.step_count()
        );
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let mut metrics = match &args.metrics {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(args.resume.is_some())
                .write(true)
                .truncate(args.resume.is_none())
                .open(p)
                .with_context(|| format!("cannot open the metrics file {}", p.display()))?,
        ),
        None => None,
    };
    eprintln!(
        "training {} on {} examples at {}px, batch {}, lr {}, {} steps on {device_name}",
        model.display(),
        trainer.dataset().len(),
        trainer.resolution(),
        args.batch_size,
        args.lr,
        args.steps
    );
    let started = Instant::now();
    let first = trainer.step_count();
    let every = (args.steps / 50).max(1);
    let mut last_loss = None;
    while trainer.step_count() < args.steps {
        let report = trainer.step()?;
        last_loss = Some(report.loss);
        if let Some(f) = metrics.as_mut() {
            // Written by hand to keep the documented key order; the loss is finite.
            writeln!(
                f,
                "{{\"step\": {}, \"loss\": {}}}",
                report.step, report.loss
            )
            .and_then(|_| f.flush())
            .context("cannot write the metrics file")?;
        }
        let checkpoint_due = args
            .checkpoint_every
            .is_some_and(|k| report.step.is_multiple_of(k));
        let stopping = stop.load(Ordering::SeqCst);
        if checkpoint_due || stopping {
            let dir = checkpoint_dir(&args.output, report.step);
            trainer
                .save_checkpoint(&dir)
                .with_context(|| format!("cannot write the checkpoint {}", dir.display()))?;
            if stopping {
                bail!(
                    "interrupted at step {}; continue with --resume {}",
                    report.step,
                    dir.display()
                );
            }
        }
        if report.step.is_multiple_of(every) || report.step == args.steps {
            let done = (report.step - first) as f64;
            eprintln!(
                "step {}/{}  loss {:.5}  {:.2} s/step",
                report.step,
                args.steps,
                report.loss,
                started.elapsed().as_secs_f64() / done.max(1.0)
            );
        }
    }
    trainer
        .save_model(&args.output)
        .with_context(|| format!("cannot write the model to {}", args.output.display()))?;
    match last_loss {
        Some(l) => println!(
            "wrote the fine-tuned model to {} ({} steps, last loss {l:.5})",
            args.output.display(),
            trainer.step_count()
        ),
        None => println!(
            "wrote the model to {} (the checkpoint already had {} steps)",
            args.output.display(),
            trainer.step_count()
        ),
    }
    Ok(())
}
