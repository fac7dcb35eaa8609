//! `farm demo`: the walkthrough's four prompts through a whole farm in one process.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use farm_proto::v1 as pb;

use crate::client::{download, submit_job, watch_job, write_grid};
use crate::{ServeAddrs, Settings};

pub const PROMPTS: [&str; 4] = [
    "a photograph of an astronaut riding a horse",
    "A cute otter in a rainbow whirlpool holding shells, watercolor",
    "An avocado armchair",
    "A white dog wearing sunglasses",
];

/// The folder name `farm demo` looks for real Stable Diffusion 1.5 weights under.
pub const REAL_MODEL: &str = "stable-diffusion-v1-5";
pub const TINY_MODEL: &str = "tiny";

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Model folder under FARM_MODELS (default: stable-diffusion-v1-5 if present, else the tiny one).
    #[arg(long)]
    pub model: Option<String>,
    /// Where the images and grid go.
    #[arg(long, default_value = "./farm-data/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Denoising steps (default 50 for a real model, 20 for the tiny one).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Image side (default 512 for a real model, 128 for the tiny one).
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,
}

pub async fn run(settings: &Settings, args: DemoArgs) -> anyhow::Result<()> {
    let real = settings.models.join(REAL_MODEL);
    let model = match &args.model {
        Some(m) => m.clone(),
        None if real.join("model_index.json").is_file() => REAL_MODEL.to_string(),
        None => TINY_MODEL.to_string(),
    };
    let tiny = model == TINY_MODEL;
    if tiny {
        let dir = settings.models.join(TINY_MODEL);
        if !dir.join("model_index.json").is_file() {
            farm_diffusion::init_tiny(&dir, 0)
                .with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
        }
        eprintln!(
            "No real model in {models}: using the tiny random-weight model at {tiny}.\n\
             A tiny random model has the real Stable Diffusion architecture but untrained weights: it draws noise, not pictures.\n\
             For real images put Stable Diffusion 1.5 (diffusers layout, safetensors) at {real}\n\
             (`farm model pull stable-diffusion-v1-5/stable-diffusion-v1-5` downloads it there)\n\
             and run `farm demo` again (or `farm demo --model NAME` for another folder under FARM_MODELS).\n",
            models = settings.models.display(),
            tiny = dir.display(),
            real = real.display(),
        );
    }
    let steps = args.steps.unwrap_or(if tiny { 20 } else { 50 });
    let size = args.size.unwrap_or(if tiny { 128 } else { 512 });

    let shutdown = crate::shutdown_on_signal();
    let addrs = ServeAddrs {
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
    };
    let (grpc, token, mut farm) =
        crate::run_dev(settings, &addrs, args.workers, shutdown.clone()).await?;
    eprintln!(
        "farm: coordinator on http://{grpc} with {} worker(s), storage {}",
        args.workers, settings.storage
    );

    let result = async {
        let mut client_settings = settings.clone();
        client_settings.coordinator = format!("http://{grpc}");
        client_settings.token = Some(token);
        let mut client = crate::client::jobs_client(&client_settings).await?;
        let spec = pb::JobSpec {
            mode: "txt2img".into(),
            model: model.clone(),
            prompts: PROMPTS.iter().map(|p| p.to_string()).collect(),
            seeds: vec![args.seed],
            width: size,
            height: size,
            steps,
            guidance_scale: Some(7.5),
            scheduler: "pndm".into(),
            ..Default::default()
        };
        let job = submit_job(&mut client, spec, "")
            .await?
            .job
            .context("no job in the answer")?;
        eprintln!(
            "job {}: {} images, {size}x{size}, {steps} steps, model {model}",
            job.id, job.tasks_total
        );
        let job = watch_job(&mut client, &job.id, true).await?;
        let written = download(&mut client, &job, &args.out).await?;
        anyhow::ensure!(
            written.len() == PROMPTS.len(),
            "only {} of {} images succeeded; see `farm status {}`",
            written.len(),
            PROMPTS.len(),
            job.id
        );
        let paths: Vec<PathBuf> = written.iter().map(|(_, p)| p.clone()).collect();
        let grid = args.out.join("grid.png");
        write_grid(&paths, 1, PROMPTS.len() as u32, &grid)?;
        println!("Images of job {}:", job.id);
        for (task, path) in &written {
            println!(
                "  {}  ({:?}, seed {})",
                path.display(),
                task.prompt,
                task.seed
            );
        }
        println!("Grid (1x4): {}", grid.display());
        anyhow::Ok(())
    }
    .await;

    shutdown.cancel();
    while let Some(done) = farm.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "farm part stopped with an error");
        }
    }
    result
}
