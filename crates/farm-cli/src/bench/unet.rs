//! `farm bench unet`: one evaluation of the full-size SD 1.5 UNet on candle, with random
//! weights (no files), on the shapes of one classifier-free-guidance step at 512×512.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use clap::Args;
use farm_diffusion::candle_core;
use farm_diffusion::config::{JsonFile, UNetConfig};
use farm_diffusion::unet::{UNet, UNetEngine};
use farm_diffusion::{DType, Device};
use serde::Serialize;

use super::{peak_rss_mib, round};

#[derive(Args, Clone, Debug)]
pub struct UnetArgs {
    /// The architecture: sd15 (Stable Diffusion 1.5's unet/config.json).
    #[arg(long, default_value = "sd15")]
    pub arch: String,
    /// Latents in the batch (2 = one CFG step of one image).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Latent side (64 = 512×512 pixels).
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// auto (farm-diffusion's own UNet on the CPU in f32, candle's otherwise), cpu or candle.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Timed evaluations after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct UnetReport {
    pub engine: &'static str,
    /// The UNet implementation: `cpu` (farm-diffusion's) or `candle` (candle-transformers').
    pub unet: &'static str,
    pub arch: String,
    pub batch: usize,
    pub dtype: String,
    pub device: String,
    pub threads: usize,
    pub params: usize,
    pub build_s: f64,
    pub warmup_s: f64,
    /// Mean of the timed runs.
    pub seconds: f64,
    pub min_s: f64,
    pub runs: Vec<f64>,
    pub peak_rss_mib: f64,
}

/// diffusers' `unet/config.json` of stable-diffusion-v1-5.
pub const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// Weights drawn from each layer's own init (Kaiming for convolutions and linears, ones and
/// zeros for norms and biases) as plain tensors: a `VarMap` would make them variables, and
/// candle would then keep every activation alive for backprop.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        _name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        // Drawn in f32 then cast: candle's CPU randn has no f16 path everywhere.
        let t = h.var(s, DType::F32, &Device::Cpu)?.as_detached_tensor();
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::bail!("random weights have no unchecked tensor {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

pub fn run(args: UnetArgs) -> anyhow::Result<()> {
    if args.arch != "sd15" {
        bail!("--arch {}: only sd15 is known", args.arch);
    }
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: use f32, f16 or bf16"),
    };
    let engine: UNetEngine = args.engine.parse()?;
    let device = farm_diffusion::parse_device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let json: serde_json::Value = serde_json::from_str(SD15_UNET)?;
    let config = UNetConfig::from_json(&JsonFile::from_value(
        Path::new("sd15/unet/config.json"),
        json,
    )?)?;

    let built = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let unet = UNet::new(vb, &config, engine)?;
    let build_s = built.elapsed().as_secs_f64();
    let params = SD15_PARAMS;

    let b = args.batch;
    let sample =
        candle_core::Tensor::randn(0f32, 1.0, (b, 4, args.latent, args.latent), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?;
    let context = candle_core::Tensor::randn(0f32, 1.0, (b, 77, 768), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(&device)?;
    let eval = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = unet.forward(&sample, 999.0, &context)?;
        // Wait for the device and make sure the result is real.
        let sum = out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        std::hint::black_box(sum);
        Ok(t.elapsed().as_secs_f64())
    };
    let warmup_s = eval()?;
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        runs.push(eval()?);
    }
    let seconds = if runs.is_empty() {
        warmup_s
    } else {
        runs.iter().sum::<f64>() / runs.len() as f64
    };
    let report = UnetReport {
        engine: "candle",
        unet: unet.engine().name(),
        arch: args.arch.clone(),
        batch: b,
        dtype: args.dtype.clone(),
        device: args.device.clone(),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        params,
        build_s: round(build_s, 2),
        warmup_s: round(warmup_s, 3),
        seconds: round(seconds, 3),
        min_s: round(
            runs.iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
                .min(warmup_s),
            3,
        ),
        runs: runs.iter().map(|r| round(*r, 3)).collect(),
        peak_rss_mib: round(peak_rss_mib(), 1),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "unet {} ({}) batch {} {} on {}: {:.3} s per evaluation (min {:.3} s, warm-up {:.3} s), peak RSS {:.0} MiB",
            report.arch,
            report.unet,
            report.batch,
            report.dtype,
            report.device,
            report.seconds,
            report.min_s,
            report.warmup_s,
            report.peak_rss_mib
        );
    }
    Ok(())
}

/// SD 1.5's UNet parameters (diffusers' count).
const SD15_PARAMS: usize = 859_520_964;
