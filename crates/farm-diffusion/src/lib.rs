//! Stable Diffusion 1.x/2.x on [candle](https://github.com/huggingface/candle).
//!
//! The crate reads a model folder in the diffusers layout (`model_index.json`, `unet/`,
//! `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), builds the models from their own
//! config files and runs the pipelines of diffusers' Stable Diffusion walkthrough with
//! classifier-free guidance: txt2img, img2img (SDEdit), legacy inpainting and the VAE
//! round trip ([`Mode`], [`Request`], [`StableDiffusion::generate`]). They are checked
//! against diffusers on a tiny random model (`tests/parity.rs`).
//!
//! Modules:
//! * [`config`] — parsing of the diffusers/transformers JSON configs into model configs.
//! * [`tokenizer`] — the CLIP byte-level BPE tokenizer (`vocab.json` + `merges.txt`).
//! * [`clip`] — the CLIP text transformer that turns token ids into text embeddings.
//! * [`schedulers`] — PNDM (PLMS), DDIM, DPM-Solver++ 2M and Euler ancestral samplers.
//! * [`pipeline`] — [`StableDiffusion`]: loading a model folder and running the pipelines.
//! * [`vae`] — the VAE: candle's decoder and an encoder exposing the posterior.
//! * [`noise`] — the seeded standard-normal draws.
//! * [`tiny`] — [`init_tiny`]: writes a tiny random-weight model with the SD 1.x architecture.
//! * [`train`] — fine-tuning the UNet on image–caption data (differentiable UNet, AdamW,
//!   checkpoints); see its docs for the recipe and its randomness.
//!
//! * [`unet`] — the denoising UNet: this crate's own f32 CPU implementation ([`unet::CpuUNet`],
//!   channels-last, fused kernels, an AVX-512 matrix product) on the CPU in f32,
//!   candle-transformers' `UNet2DConditionModel` on other devices and dtypes.
//!
//! The VAE decoder is candle's `AutoEncoderKL`, its encoder is built in [`vae`] from candle's
//! blocks.
//!
//! # Parity with diffusers, and known deviations
//!
//! `tests/parity.rs` runs diffusers' own outputs (written by `scripts/parity/make_fixtures.py`
//! on a tiny random model with fixed noise) through every pipeline; on the CPU in f32 images
//! reach 82 dB PSNR or more, most of them pixel-identical (bar: 45 dB; one step fewer gives
//! about 37 dB, another scheduler about 26 dB; candle's UNet gave 74-81 dB). Known, measured
//! deviations:
//!
//! * candle's GEGLU (the UNet transformer feed-forward, used off the CPU or outside f32)
//!   uses the tanh approximation of GELU where diffusers uses the exact erf form
//!   (|difference| < 5e-4 per activation); [`unet::CpuUNet`] uses the erf form.
//!   `tests/unet.rs` checks the two UNets against each other.
//! * Scheduler coefficients are computed in `f64` (diffusers: `float32`).
//! * candle's VAE attention mixes the images of a batch, so the VAE runs one image at a
//!   time ([`vae`]); the UNet is batched.
//! * Legacy inpainting noises the kept region to the level of the step just taken
//!   (`timesteps[i]`) for every scheduler, as the legacy pipeline does for DDPM-style ones.
//!
//! # Randomness
//!
//! All randomness is drawn on the CPU so that results do not depend on the device. Image
//! `i` of a batch uses the seed `s = seed + i` (wrapping), so batches do not change images.
//! Per image there are exactly two standard-normal draws, plus Euler ancestral's per-step
//! noise; each is `rand_chacha::ChaCha8Rng::seed_from_u64(s)` on its own stream, sampling
//! `rand_distr::StandardNormal` as `f32`, one value at a time, in row-major order of a
//! `[1, C, H/f, W/f]` latent tensor (`f` = the VAE scale factor, 8 for SD 1.x), then moved
//! to the device and cast to the model dtype:
//!
//! * **`noise`** (stream 0): txt2img's initial latents (times the scheduler's
//!   `init_noise_sigma`); for img2img and inpaint, the noise added to the encoded image.
//! * **Euler ancestral per-step noise** (stream 1): one latent-shaped draw per step.
//! * **`vae_noise`** (stream 2): the posterior draw `mean + std * vae_noise` whenever an
//!   image is encoded (img2img, inpaint, reconstruct).
//!
//! `noise` and `vae_noise` may be supplied by the caller instead ([`Request::noise`]).
//! * **[`init_tiny`] weights**: `ChaCha8Rng::seed_from_u64(seed)` with one stream per model
//!   (UNet 1, VAE 2, text encoder 3), variables filled in lexicographic order of their names.
//!
//! Same model, same request and same device/dtype therefore give identical pixels.
use std::str::FromStr;

pub mod clip;
pub mod config;
#[cfg(feature = "hub")]
pub mod hub;
pub mod noise;
pub mod pipeline;
pub mod schedulers;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
mod weights;

/// candle's tensor crate, for callers that pass noise tensors or read safetensors files.
pub use candle_core;
pub use candle_core::{DType, Device};
pub use pipeline::StableDiffusion;
pub use tiny::{init_random, init_tiny, ModelSize};

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
    /// The model produced NaN or infinite values (broken weights, or f16 overflow).
    #[error("the decoded image holds {0} NaN or infinite values")]
    NotFinite(usize),
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

/// What a [`Request`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Text to image from pure noise.
    #[default]
    Txt2Img,
    /// SDEdit: noise the encoded init image to `strength` and denoise it with the prompt.
    Img2Img,
    /// Legacy inpainting: like img2img, but the mask's black region is kept from the init
    /// image after every step (white = repaint).
    Inpaint,
    /// VAE round trip: encode the init image, draw from the posterior, decode.
    Reconstruct,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Txt2Img,
        Mode::Img2Img,
        Mode::Inpaint,
        Mode::Reconstruct,
    ];

    /// `"txt2img"`, `"img2img"`, `"inpaint"` or `"reconstruct"`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
            Mode::Inpaint => "inpaint",
            Mode::Reconstruct => "reconstruct",
        }
    }

    /// Whether the mode starts from an init image.
    pub fn needs_init_image(&self) -> bool {
        !matches!(self, Mode::Txt2Img)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                DiffusionError::InvalidInput(format!(
                    "unknown mode {s:?}; expected one of txt2img, img2img, inpaint, reconstruct"
                ))
            })
    }
}

/// A request for any pipeline, for one image or a batch.
///
/// Image `i` of the batch uses seed `seed + i` (wrapping) for all of its randomness, so a
/// batch gives the same images as the same seeds run one by one.
#[derive(Debug, Clone)]
pub struct Request {
    pub mode: Mode,
    pub prompt: String,
    /// The unconditional text for classifier-free guidance; empty string for none.
    pub negative_prompt: String,
    /// Pixels; a multiple of 8. With an init image it must equal the image's width.
    pub width: usize,
    /// Pixels; a multiple of 8. With an init image it must equal the image's height.
    pub height: usize,
    /// Inference steps of the schedule (img2img/inpaint run `int(steps * strength)` of them).
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` disables the unconditional pass.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    /// Images in the batch, `1..=`[`pipeline::MAX_BATCH`].
    pub num_images: usize,
    /// img2img/inpaint: how much of the schedule to run, in `[0, 1]`.
    pub strength: f64,
    /// img2img, inpaint and reconstruct: the image to start from.
    pub init_image: Option<RgbImage>,
    /// inpaint: white = repaint, black = keep (converted to luma). Another size is resized
    /// when its aspect ratio matches the init image's.
    pub mask: Option<RgbImage>,
    /// Instead of the seeds' draws: `noise`, `[num_images, C, H/f, W/f]` (any float dtype,
    /// any device), like diffusers' `latents=` (txt2img multiplies it by
    /// `init_noise_sigma`).
    pub noise: Option<candle_core::Tensor>,
    /// Instead of the seeds' draws: the posterior noise, same shape as `noise`.
    pub vae_noise: Option<candle_core::Tensor>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            mode: Mode::Txt2Img,
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 50,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Pndm,
            seed: 0,
            num_images: 1,
            strength: 0.8,
            init_image: None,
            mask: None,
            noise: None,
            vae_noise: None,
        }
    }
}

impl From<&Txt2Img> for Request {
    fn from(t: &Txt2Img) -> Self {
        Self {
            mode: Mode::Txt2Img,
            prompt: t.prompt.clone(),
            negative_prompt: t.negative_prompt.clone(),
            width: t.width,
            height: t.height,
            steps: t.steps,
            guidance_scale: t.guidance_scale,
            scheduler: t.scheduler,
            seed: t.seed,
            ..Default::default()
        }
    }
}

/// One image of a batch ([`StableDiffusion::generate_batch`]): what may differ between
/// images that share one UNet call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    pub prompt: String,
    /// The unconditional text for classifier-free guidance; empty string for none.
    pub negative_prompt: String,
    pub seed: u64,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Parses `"f32"`, `"f16"` or `"bf16"` into a compute dtype.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(DiffusionError::InvalidInput(format!(
            "unknown dtype {other:?}; expected f32, f16 or bf16"
        ))),
    }
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
