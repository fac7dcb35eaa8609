//! `farm bench memory`: a worker's resident memory with a full-size model loaded.
//!
//! It writes a random-weight model of Stable Diffusion 1.5's architecture in diffusers
//! layout (kept for later runs), then loads it in a fresh child process the way a worker
//! does (`StableDiffusion::load`, safetensors memory-mapped) and reports that process's
//! resident set after loading and at its peak, against the weights' size on disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use farm_diffusion::{DType, Device, ModelSize, StableDiffusion};
use serde::{Deserialize, Serialize};

use super::{peak_rss_mib, round, rss_mib};

#[derive(Args, Clone, Debug)]
pub struct MemoryArgs {
    /// The architecture: sd15 (Stable Diffusion 1.5's full size) or tiny.
    #[arg(long, default_value = "sd15")]
    pub arch: String,
    /// Where the random-weight model is written (and reused when already there); default: a
    /// folder under the system's temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The dtype the worker computes in: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long)]
    pub json: bool,
    /// Internal: load the model in `dir` and print what this process used, as JSON.
    #[arg(long, hide = true)]
    pub load_only: bool,
}

/// What the child that loaded the model measured of itself.
#[derive(Debug, Serialize, Deserialize)]
struct Loaded {
    load_s: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    arch: String,
    dtype: String,
    /// Size of the model's safetensors files.
    weights_on_disk_mib: f64,
    load_s: f64,
    /// Resident set of the loading process once the model is loaded.
    rss_after_load_mib: f64,
    /// Its peak resident set (`VmHWM`) while loading.
    peak_rss_mib: f64,
    /// `peak_rss_mib` / `weights_on_disk_mib`.
    peak_over_weights: f64,
}

fn dtype_of(name: &str) -> anyhow::Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: use f32, f16 or bf16"),
    })
}

fn size_of(arch: &str) -> anyhow::Result<ModelSize> {
    Ok(match arch {
        "sd15" => ModelSize::Sd15,
        "tiny" => ModelSize::Tiny,
        other => bail!("--arch {other}: use sd15 or tiny"),
    })
}

fn safetensors_bytes(dir: &Path) -> u64 {
    ["unet", "vae", "text_encoder"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(dir.join(sub)).ok())
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

const MIB: f64 = 1024.0 * 1024.0;

pub fn run(args: MemoryArgs) -> anyhow::Result<()> {
    let size = size_of(&args.arch)?;
    let dtype = dtype_of(&args.dtype)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("farm-{}-random", args.arch)));
    if args.load_only {
        let started = Instant::now();
        let model = StableDiffusion::load(&dir, &Device::Cpu, dtype)
            .with_context(|| format!("cannot load {}", dir.display()))?;
        let loaded = Loaded {
            load_s: round(started.elapsed().as_secs_f64(), 2),
            rss_mib: round(rss_mib(), 1),
            peak_rss_mib: round(peak_rss_mib(), 1),
        };
        drop(model);
        println!("{}", serde_json::to_string(&loaded)?);
        return Ok(());
    }
    if !dir.join("model_index.json").is_file() {
        eprintln!(
            "writing a random-weight {} model to {} (kept for later runs)",
            args.arch,
            dir.display()
        );
        // Written to a side folder first, so an interrupted run leaves no half model behind.
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        farm_diffusion::init_random(&partial, size, 0)?;
        std::fs::rename(&partial, &dir)
            .with_context(|| format!("cannot move the model to {}", dir.display()))?;
    }
    let exe = std::env::current_exe().context("cannot find the farm binary")?;
    let out = Command::new(exe)
        .args(["bench", "memory", "--load-only", "--arch", &args.arch])
        .args(["--dtype", &args.dtype])
        .arg("--dir")
        .arg(&dir)
        .output()
        .context("cannot start the loading process")?;
    if !out.status.success() {
        bail!(
            "loading {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let loaded: Loaded = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "unexpected output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let on_disk = safetensors_bytes(&dir) as f64 / MIB;
    let report = MemoryReport {
        arch: args.arch.clone(),
        dtype: args.dtype.clone(),
        weights_on_disk_mib: round(on_disk, 1),
        load_s: loaded.load_s,
        rss_after_load_mib: loaded.rss_mib,
        peak_rss_mib: loaded.peak_rss_mib,
        peak_over_weights: round(loaded.peak_rss_mib / on_disk.max(1e-9), 2),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} in {}: weights {:.0} MiB on disk; loaded in {:.1} s; \
             RSS {:.0} MiB after loading, peak {:.0} MiB ({:.2}x the weights)",
            report.arch,
            report.dtype,
            report.weights_on_disk_mib,
            report.load_s,
            report.rss_after_load_mib,
            report.peak_rss_mib,
            report.peak_over_weights
        );
    }
    Ok(())
}
