//! Stable Diffusion 1.x text-to-image on [candle](https://github.com/huggingface/candle).
//!
//! The crate reads a model folder in the diffusers layout (`model_index.json`, `unet/`,
//! `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), builds the models from their own
//! config files and runs the txt2img pipeline with classifier-free guidance.
//!
//! Modules:
//! * [`config`] — parsing of the diffusers/transformers JSON configs into model configs.
//! * [`tokenizer`] — the CLIP byte-level BPE tokenizer (`vocab.json` + `merges.txt`).
//! * [`clip`] — the CLIP text transformer that turns token ids into text embeddings.
//! * [`schedulers`] — PNDM (PLMS), DDIM, DPM-Solver++ 2M and Euler ancestral samplers.
//! * [`pipeline`] — [`StableDiffusion`]: loading a model folder and running txt2img.
//! * [`tiny`] — [`init_tiny`]: writes a tiny random-weight model with the SD 1.x architecture.
//!
//! The UNet and the VAE are candle-transformers' `UNet2DConditionModel` and `AutoEncoderKL`.
//!
//! # Randomness
//!
//! All randomness is drawn on the CPU so that results do not depend on the device:
//!
//! * **Initial latents**: `rand_chacha::ChaCha8Rng::seed_from_u64(seed)` (stream 0), sampling
//!   `rand_distr::StandardNormal` as `f32`, one value at a time, in row-major order of the
//!   `[1, C, H/f, W/f]` latent tensor (`f` = the VAE scale factor, 8 for SD 1.x). The tensor
//!   is then moved to the device, cast to the model dtype, and multiplied by the scheduler's
//!   `init_noise_sigma`.
//! * **Euler ancestral per-step noise**: a second generator
//!   `ChaCha8Rng::seed_from_u64(seed)` with `set_stream(1)`, sampled the same way, one full
//!   latent-shaped tensor per step.
//! * **[`init_tiny`] weights**: `ChaCha8Rng::seed_from_u64(seed)` with one stream per model
//!   (UNet 1, VAE 2, text encoder 3), variables filled in lexicographic order of their names.
//!
//! Same model, same request and same device/dtype therefore give identical pixels.
use std::str::FromStr;

pub mod clip;
pub mod config;
pub mod pipeline;
pub mod schedulers;
pub mod tiny;
pub mod tokenizer;

pub use candle_core::{DType, Device};
pub use pipeline::StableDiffusion;
pub use tiny::init_tiny;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A model file is missing or malformed; `path` names the file, `message` the key/problem.
    #[error("{path}: {message}")]
    Model { path: String, message: String },
    /// The request (or a device string) is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The progress callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DiffusionError {
    pub(crate) fn model(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        DiffusionError::Model {
            path: path.as_ref().display().to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

/// The sampler used for denoising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// PNDM with `skip_prk_steps` (i.e. PLMS), SD 1.x's default.
    Pndm,
    /// DDIM with eta = 0.
    Ddim,
    /// DPM-Solver++ 2M (multistep, second order).
    DpmSolverMultistep,
    /// Euler ancestral.
    EulerAncestral,
}

impl SchedulerKind {
    /// All kinds, in a stable order.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::EulerAncestral,
    ];

    /// Short name: `"pndm"`, `"ddim"`, `"dpm++"` or `"euler-a"`.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmSolverMultistep => "dpm++",
            SchedulerKind::EulerAncestral => "euler-a",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                DiffusionError::InvalidInput(format!(
                    "unknown scheduler {s:?}; expected one of pndm, ddim, dpm++, euler-a"
                ))
            })
    }
}

/// A text-to-image request.
#[derive(Debug, Clone)]
pub struct Txt2Img {
    pub prompt: String,
    /// Empty string for none.
    pub negative_prompt: String,
    /// Pixels; must be a multiple of 8.
    pub width: usize,
    /// Pixels; must be a multiple of 8.
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` disables the unconditional pass.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    pub seed: u64,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Parses `"cpu"`, `"cuda"` or `"cuda:N"` into a device.
///
/// CUDA devices need the crate's `cuda` feature; without it a clear `InvalidInput` is returned.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                DiffusionError::InvalidInput(format!(
                    "bad device {s:?}: expected cpu, cuda or cuda:N with N a GPU index"
                ))
            })?,
            None => {
                return Err(DiffusionError::InvalidInput(format!(
                    "bad device {s:?}: expected cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(DiffusionError::InvalidInput(format!(
            "device {s:?} requested but farm-diffusion was built without CUDA support \
             (rebuild with the `cuda` feature)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        DiffusionError::InvalidInput(format!("cannot open CUDA device {ordinal}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().ok(), Some(k));
        }
        assert!("nope".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn devices() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(
            parse_device("tpu"),
            Err(DiffusionError::InvalidInput(_))
        ));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(DiffusionError::InvalidInput(_))
        ));
        #[cfg(not(feature = "cuda"))]
        match parse_device("cuda:0") {
            Err(DiffusionError::InvalidInput(m)) => assert!(m.contains("without CUDA")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn model_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<StableDiffusion>();
    }
}
