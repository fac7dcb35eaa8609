//! The txt2img pipeline: loading a diffusers model folder and generating images.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, JsonFile, SchedulerConfig, UNetConfig, VaeConfig};
use crate::tokenizer::Tokenizer;
use crate::{schedulers, DiffusionError, Result, RgbImage, Txt2Img};

/// Largest accepted image side, in pixels.
pub const MAX_SIDE: usize = 4096;

/// A loaded Stable Diffusion 1.x model. Immutable after loading: share it with `Arc`.
pub struct StableDiffusion {
    device: Device,
    dtype: DType,
    tokenizer: Tokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    unet_config: UNetConfig,
    vae: AutoEncoderKL,
    vae_config: VaeConfig,
    scheduler_config: SchedulerConfig,
}

/// Memory-maps a safetensors file into a `VarBuilder`, reporting a missing file as a
/// model error.
fn weights(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    if !path.is_file() {
        return Err(DiffusionError::model(path, "missing weights file"));
    }
    // SAFETY: the file is memory-mapped read-only; as with every mmap, it must not be
    // modified while the model is loaded. Model folders are treated as immutable.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .map_err(|e| DiffusionError::model(path, format!("cannot read safetensors: {e}")))
}

fn model_err(path: &Path) -> impl Fn(candle_core::Error) -> DiffusionError + '_ {
    move |e| DiffusionError::model(path, format!("cannot build model: {e}"))
}

impl StableDiffusion {
    /// Loads a diffusers-layout model folder onto `device` with weights cast to `dtype`
    /// (`F32`, `F16` or `BF16`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(DiffusionError::InvalidInput(format!(
                "unsupported dtype {dtype:?}; use f32, f16 or bf16"
            )));
        }
        let index = JsonFile::read(&dir.join("model_index.json"))?;
        let class = index.string_or("_class_name", "StableDiffusionPipeline")?;
        tracing::debug!(dir = %dir.display(), %class, "loading diffusion model");

        let p = |s: &str| -> PathBuf { dir.join(s) };
        let unet_config = UNetConfig::from_json(&JsonFile::read(&p("unet/config.json"))?)?;
        let vae_config = VaeConfig::from_json(&JsonFile::read(&p("vae/config.json"))?)?;
        let text_config =
            ClipTextConfig::from_json(&JsonFile::read(&p("text_encoder/config.json"))?)?;
        let scheduler_config =
            SchedulerConfig::from_json(&JsonFile::read(&p("scheduler/scheduler_config.json"))?)?;
        let tokenizer = Tokenizer::load(&p("tokenizer"))?;
        if text_config.hidden_size != unet_config.candle.cross_attention_dim {
            return Err(DiffusionError::model(
                p("unet/config.json"),
                format!(
                    "key `cross_attention_dim`: {} does not match the text encoder's hidden_size {}",
                    unet_config.candle.cross_attention_dim, text_config.hidden_size
                ),
            ));
        }
        if vae_config.candle.latent_channels != unet_config.in_channels
            || unet_config.in_channels != unet_config.out_channels
        {
            return Err(DiffusionError::model(
                p("unet/config.json"),
                format!(
                    "keys `in_channels`/`out_channels`: expected {} (the VAE's latent_channels)",
                    vae_config.candle.latent_channels
                ),
            ));
        }

        let path = p("text_encoder/model.safetensors");
        let text_encoder = ClipTextModel::new(weights(&path, dtype, device)?, &text_config)
            .map_err(model_err(&path))?;
        let path = p("unet/diffusion_pytorch_model.safetensors");
        let unet = UNet2DConditionModel::new(
            weights(&path, dtype, device)?,
            unet_config.in_channels,
            unet_config.out_channels,
            false,
            unet_config.candle.clone(),
        )
        .map_err(model_err(&path))?;
        let path = p("vae/diffusion_pytorch_model.safetensors");
        let vae = AutoEncoderKL::new(
            weights(&path, dtype, device)?,
            vae_config.in_channels,
            vae_config.out_channels,
            vae_config.candle.clone(),
        )
        .map_err(model_err(&path))?;
        Ok(Self {
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler_config,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Pixels per latent cell (8 for SD 1.x; 2 for the tiny model).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    fn validate(&self, req: &Txt2Img) -> Result<()> {
        let multiple = self.vae_scale_factor().max(8);
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % multiple != 0 || v > MAX_SIDE {
                return Err(DiffusionError::InvalidInput(format!(
                    "{name} must be a positive multiple of {multiple} up to {MAX_SIDE}, got {v}"
                )));
            }
        }
        if !req.guidance_scale.is_finite() {
            return Err(DiffusionError::InvalidInput(
                "guidance_scale must be a finite number".into(),
            ));
        }
        Ok(())
    }

    /// Text embeddings `[n, 77, hidden]` for the given prompts.
    fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.tokenizer.encode(p))
            .collect();
        let ids = Tensor::from_vec(
            ids,
            (prompts.len(), crate::tokenizer::MAX_LEN),
            &self.device,
        )?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// The seeded initial noise (before `init_noise_sigma`), see the crate docs.
    fn initial_noise(&self, seed: u64, h: usize, w: usize) -> Result<Tensor> {
        let c = self.unet_config.in_channels;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..c * h * w)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        Ok(Tensor::from_vec(values, (1, c, h, w), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Generates one image. `on_step(done, total)` runs after every denoising step (`total`
    /// is the scheduler's number of UNet evaluations: `steps + 1` for PNDM); returning
    /// `false` stops with [`DiffusionError::Cancelled`].
    pub fn txt2img(
        &self,
        req: &Txt2Img,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<RgbImage> {
        self.validate(req)?;
        let mut scheduler =
            schedulers::build(req.scheduler, &self.scheduler_config, req.steps, req.seed)?;
        let guided = req.guidance_scale > 1.0;
        let embeddings = if guided {
            self.encode_prompts(&[req.negative_prompt.as_str(), req.prompt.as_str()])?
        } else {
            self.encode_prompts(&[req.prompt.as_str()])?
        };

        let f = self.vae_scale_factor();
        let mut latents = (self.initial_noise(req.seed, req.height / f, req.width / f)?
            * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(input, i)?;
            let pred = self.unet.forward(&input, t, &embeddings)?;
            let pred = if guided {
                let uncond = pred.narrow(0, 0, 1)?;
                let cond = pred.narrow(0, 1, 1)?;
                (&uncond + ((cond - &uncond)? * req.guidance_scale)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents)?;
            if !on_step(i + 1, total) {
                return Err(DiffusionError::Cancelled);
            }
        }
        self.decode(&latents)
    }

    /// VAE-decodes latents `[1, C, h, w]` into an RGB image.
    fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        let image = self
            .vae
            .decode(&(latents / self.vae_config.scaling_factor)?)?
            .to_dtype(DType::F32)?;
        let image = ((image / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .affine(255.0, 0.0)?
            .round()?
            .to_dtype(DType::U8)?;
        let (_, channels, height, width) = image.dims4()?;
        if channels != 3 {
            return Err(DiffusionError::InvalidInput(format!(
                "the VAE produces {channels} channels; only RGB is supported"
            )));
        }
        let pixels = image
            .get(0)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let to_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| DiffusionError::InvalidInput("image too large".into()))
        };
        Ok(RgbImage {
            width: to_u32(width)?,
            height: to_u32(height)?,
            pixels,
        })
    }
}
