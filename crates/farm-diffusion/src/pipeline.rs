//! The pipelines: loading a diffusers model folder and generating images.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, JsonFile, SchedulerConfig, UNetConfig, VaeConfig};
use crate::noise::{self, ANCESTRAL_STREAM, NOISE_STREAM, VAE_NOISE_STREAM};
use crate::schedulers::Scheduler;
use crate::tokenizer::Tokenizer;
use crate::unet::{UNet, UNetEngine};
use crate::vae::Vae;
use crate::{schedulers, BatchItem, DiffusionError, Mode, Request, Result, RgbImage, Txt2Img};

/// Largest accepted image side, in pixels.
pub const MAX_SIDE: usize = 4096;
/// Largest batch ([`Request::num_images`]).
pub const MAX_BATCH: usize = 64;

/// A hook run after every denoising step: `(scheduler, (step index, latents))` -> latents.
type AfterStep<'a> = dyn FnMut(&dyn Scheduler, (usize, Tensor)) -> Result<Tensor> + 'a;

/// A loaded Stable Diffusion 1.x model. Immutable after loading: share it with `Arc`.
pub struct StableDiffusion {
    device: Device,
    dtype: DType,
    tokenizer: Tokenizer,
    text_encoder: ClipTextModel,
    unet: UNet,
    unet_config: UNetConfig,
    vae: Vae,
    scheduler_config: SchedulerConfig,
    weight_bytes: u64,
}

/// Memory-maps a safetensors file into a `VarBuilder`, reporting a missing file as a
/// model error; with the bytes its tensors take in `dtype`.
fn weights(path: &Path, dtype: DType, device: &Device) -> Result<(VarBuilder<'static>, u64)> {
    if !path.is_file() {
        return Err(DiffusionError::model(path, "missing weights file"));
    }
    let mapped = crate::weights::MappedWeights::open(path)
        .map_err(|e| DiffusionError::model(path, format!("cannot read safetensors: {e}")))?;
    let held = mapped.held_bytes(dtype);
    Ok((
        VarBuilder::from_backend(Box::new(mapped), dtype, device.clone()),
        held,
    ))
}

fn model_err(path: &Path) -> impl Fn(candle_core::Error) -> DiffusionError + '_ {
    move |e| DiffusionError::model(path, format!("cannot build model: {e}"))
}

impl StableDiffusion {
    /// Loads a diffusers-layout model folder onto `device` with weights cast to `dtype`
    /// (`F32`, `F16` or `BF16`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_vae(dir, None, device, dtype)
    }

    /// Like [`load`](Self::load), with the VAE taken from `vae_dir` when given: a folder
    /// holding `config.json` and `diffusion_pytorch_model.safetensors` (a diffusers
    /// `AutoencoderKL`, e.g. a decoder fine-tuned with MSE), or a model folder with `vae/`.
    pub fn load_with_vae(
        dir: &Path,
        vae_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
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
        let vae_dir = match vae_dir {
            None => p("vae"),
            Some(v) if !v.join("config.json").exists() && v.join("vae/config.json").exists() => {
                v.join("vae")
            }
            Some(v) => v.to_path_buf(),
        };
        let vae_config = VaeConfig::from_json(&JsonFile::read(&vae_dir.join("config.json"))?)?;
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
        let (vb, text_bytes) = weights(&path, dtype, device)?;
        let text_encoder = ClipTextModel::new(vb, &text_config).map_err(model_err(&path))?;
        let path = p("unet/diffusion_pytorch_model.safetensors");
        let (vb, unet_bytes) = weights(&path, dtype, device)?;
        let unet = UNet::new(vb, &unet_config, UNetEngine::Auto).map_err(model_err(&path))?;
        let path = vae_dir.join("diffusion_pytorch_model.safetensors");
        let (vb, vae_bytes) = weights(&path, dtype, device)?;
        let vae = Vae::new(vb, &vae_config).map_err(model_err(&path))?;
        let weight_bytes = text_bytes + unet_bytes + vae_bytes;
        Ok(Self {
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            vae,
            scheduler_config,
            weight_bytes,
        })
    }

    /// The bytes its weights take in its dtype (text encoder, UNet, VAE; every tensor of
    /// their files): what a model cache counts it as.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
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

    /// Pixels per latent cell (8 for SD 1.x and the tiny model).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
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

    /// The token ids (77) of `prompt` and the text encoder's last hidden state
    /// `[1, 77, hidden]` (in the model dtype).
    pub fn embed(&self, prompt: &str) -> Result<(Vec<u32>, Tensor)> {
        let ids = self.tokenizer.encode(prompt);
        let embeddings = self.encode_prompts(&[prompt])?;
        Ok((ids, embeddings))
    }

    /// Generates one image. `on_step(done, total)` runs after every denoising step (`total`
    /// is the scheduler's number of UNet evaluations: `steps + 1` for PNDM); returning
    /// `false` stops with [`DiffusionError::Cancelled`].
    pub fn txt2img(
        &self,
        req: &Txt2Img,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<RgbImage> {
        let mut images = self.generate(&Request::from(req), on_step)?;
        images
            .pop()
            .ok_or_else(|| DiffusionError::InvalidInput("no image was generated".into()))
    }

    /// Checks a request and returns the latent size `(c, h, w)`.
    fn validate(&self, req: &Request) -> Result<(usize, usize, usize)> {
        let invalid = |m: String| Err(DiffusionError::InvalidInput(m));
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || !v.is_multiple_of(8) || v > MAX_SIDE {
                return invalid(format!(
                    "{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {v}"
                ));
            }
        }
        let f = self.vae_scale_factor();
        if !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
            return invalid(format!(
                "width and height must be multiples of the VAE scale factor {f}"
            ));
        }
        if !req.guidance_scale.is_finite() {
            return invalid("guidance_scale must be a finite number".into());
        }
        if req.num_images == 0 || req.num_images > MAX_BATCH {
            return invalid(format!(
                "num_images must be between 1 and {MAX_BATCH}, got {}",
                req.num_images
            ));
        }
        if !(0.0..=1.0).contains(&req.strength) {
            return invalid(format!("strength must be in [0, 1], got {}", req.strength));
        }
        if req.mode.needs_init_image() {
            let Some(img) = &req.init_image else {
                return invalid(format!("mode {} needs an init image", req.mode));
            };
            check_image(img, "init image")?;
            if (img.width as usize, img.height as usize) != (req.width, req.height) {
                return invalid(format!(
                    "the init image is {}x{} but the request asks for {}x{}",
                    img.width, img.height, req.width, req.height
                ));
            }
        }
        if req.mode == Mode::Inpaint {
            let Some(mask) = &req.mask else {
                return invalid("mode inpaint needs a mask".into());
            };
            check_image(mask, "mask")?;
            let (mw, mh) = (mask.width as usize, mask.height as usize);
            if mw * req.height != mh * req.width {
                return invalid(format!(
                    "the mask is {mw}x{mh} but the image is {}x{}: a mask of another size \
                     must have the same aspect ratio",
                    req.width, req.height
                ));
            }
        }
        let shape = (self.unet_config.in_channels, req.height / f, req.width / f);
        for (name, t) in [("noise", &req.noise), ("vae_noise", &req.vae_noise)] {
            if let Some(t) = t {
                let want = [req.num_images, shape.0, shape.1, shape.2];
                if t.dims() != want {
                    return invalid(format!(
                        "{name} has shape {:?}; expected {want:?} ([num_images, C, H/{f}, W/{f}])",
                        t.dims()
                    ));
                }
            }
        }
        Ok(shape)
    }

    /// The caller's noise, or one seeded draw per image.
    fn noise(
        &self,
        given: Option<&Tensor>,
        seeds: &[u64],
        stream: u64,
        shape: (usize, usize, usize),
    ) -> Result<Tensor> {
        match given {
            Some(t) => Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?),
            None => noise::batch(seeds, stream, shape, &self.device, self.dtype),
        }
    }

    /// Runs any pipeline for a batch of `req.num_images` images (image `i` uses seed
    /// `seed + i`). `on_step(done, total)` runs after every denoising step; returning
    /// `false` stops with [`DiffusionError::Cancelled`].
    pub fn generate(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<RgbImage>> {
        let items: Vec<BatchItem> = (0..req.num_images)
            .map(|i| BatchItem {
                prompt: req.prompt.clone(),
                negative_prompt: req.negative_prompt.clone(),
                seed: noise::image_seed(req.seed, i),
            })
            .collect();
        self.run(req, &items, on_step)
    }

    /// Renders one image per item in one batch: every UNet call covers all of them. The
    /// items share `req`'s everything but prompt, negative prompt and seed (`req.prompt`,
    /// `req.negative_prompt`, `req.seed` and `req.num_images` are ignored); image `i` is the
    /// image `items[i]` gives alone, from its own seed's noise.
    pub fn generate_batch(
        &self,
        req: &Request,
        items: &[BatchItem],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<RgbImage>> {
        let req = Request {
            num_images: items.len(),
            ..req.clone()
        };
        self.run(&req, items, on_step)
    }

    fn run(
        &self,
        req: &Request,
        items: &[BatchItem],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<RgbImage>> {
        let shape = self.validate(req)?;
        let seeds: Vec<u64> = items.iter().map(|i| i.seed).collect();

        // The encoded init image, sampled from its posterior (unscaled latents).
        let encoded = match &req.init_image {
            Some(img) if req.mode.needs_init_image() => {
                let posterior = self.vae.encode(&self.image_tensor(img)?)?;
                let vae_noise =
                    self.noise(req.vae_noise.as_ref(), &seeds, VAE_NOISE_STREAM, shape)?;
                let z = posterior
                    .mean
                    .broadcast_add(&posterior.std.broadcast_mul(&vae_noise)?)?;
                Some(z)
            }
            _ => None,
        };
        if req.mode == Mode::Reconstruct {
            let z = encoded
                .ok_or_else(|| DiffusionError::InvalidInput("reconstruct needs an image".into()))?;
            return self.decode_unscaled(&z);
        }

        let mut scheduler =
            schedulers::build_batch(req.scheduler, &self.scheduler_config, req.steps, &seeds)?;
        let _ = ANCESTRAL_STREAM; // documented in `noise`; drawn by the Euler ancestral scheduler
        let noise = self.noise(req.noise.as_ref(), &seeds, NOISE_STREAM, shape)?;
        let guided = req.guidance_scale > 1.0;
        let embeddings = self.batch_embeddings(items, guided)?;
        let sf = self.vae.config.scaling_factor;
        let total = scheduler.timesteps().len();

        let latents = match (req.mode, encoded) {
            (Mode::Txt2Img, _) => {
                let latents = (noise * scheduler.init_noise_sigma())?;
                self.denoise(
                    scheduler.as_mut(),
                    latents,
                    0,
                    &embeddings,
                    req.guidance_scale,
                    on_step,
                    &mut |_, (_, l)| Ok(l),
                )?
            }
            (Mode::Img2Img | Mode::Inpaint, Some(z)) => {
                let init = (z * sf)?;
                // diffusers' get_timesteps: init_timestep = min(int(steps * strength), steps),
                // t_start = steps - init_timestep (an index into the scheduler's list).
                let init_timestep = ((req.steps as f64 * req.strength) as usize).min(req.steps);
                let start = req.steps - init_timestep;
                if init_timestep == 0 || start >= total {
                    init
                } else {
                    let latents = scheduler.add_noise(&init, &noise, start)?;
                    let keep = match (&req.mask, req.mode) {
                        (Some(mask), Mode::Inpaint) => Some(self.keep_mask(mask, shape)?),
                        _ => None,
                    };
                    match keep {
                        None => self.denoise(
                            scheduler.as_mut(),
                            latents,
                            start,
                            &embeddings,
                            req.guidance_scale,
                            on_step,
                            &mut |_, (_, l)| Ok(l),
                        )?,
                        Some((keep, repaint)) => {
                            let blend = |kept: &Tensor, l: &Tensor| -> Result<Tensor> {
                                Ok((kept.broadcast_mul(&keep)? + l.broadcast_mul(&repaint)?)?)
                            };
                            let latents = self.denoise(
                                scheduler.as_mut(),
                                latents,
                                start,
                                &embeddings,
                                req.guidance_scale,
                                on_step,
                                &mut |s: &dyn Scheduler, (i, l)| {
                                    // The kept region: the original latents noised to this
                                    // step's level with the same noise.
                                    let proper = s.add_noise(&init, &noise, i)?;
                                    blend(&proper, &l)
                                },
                            )?;
                            blend(&init, &latents)?
                        }
                    }
                }
            }
            (mode, _) => {
                return Err(DiffusionError::InvalidInput(format!(
                    "mode {mode} needs an init image"
                )))
            }
        };
        self.decode_unscaled(&(latents / sf)?)
    }

    /// Text embeddings for the batch: `[uncond x n, cond x n]` when guided (image `i`'s
    /// halves are rows `i` and `n + i`), else `[cond x n]`. Each distinct text is encoded
    /// once.
    fn batch_embeddings(&self, items: &[BatchItem], guided: bool) -> Result<Tensor> {
        fn row<'a>(texts: &mut Vec<&'a str>, text: &'a str) -> usize {
            texts.iter().position(|t| *t == text).unwrap_or_else(|| {
                texts.push(text);
                texts.len() - 1
            })
        }
        let mut texts: Vec<&str> = Vec::new();
        let mut rows: Vec<usize> = Vec::with_capacity(2 * items.len());
        if guided {
            for item in items {
                rows.push(row(&mut texts, &item.negative_prompt));
            }
        }
        for item in items {
            rows.push(row(&mut texts, &item.prompt));
        }
        let encoded = self.encode_prompts(&texts)?;
        let rows = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(),
            rows.len(),
            &self.device,
        )?;
        Ok(encoded.index_select(&rows, 0)?)
    }

    /// The denoising loop from step `start` on. `after_step(scheduler, (index, latents))`
    /// may replace the latents after each step (inpainting).
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        mut latents: Tensor,
        start: usize,
        embeddings: &Tensor,
        guidance_scale: f64,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
        after_step: &mut AfterStep<'_>,
    ) -> Result<Tensor> {
        let guided = guidance_scale > 1.0;
        let n = latents.dim(0)?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len().saturating_sub(start);
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(input, i)?;
            let pred = self.unet.forward(&input, t, embeddings)?;
            let pred = if guided {
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * guidance_scale)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents)?;
            latents = after_step(&*scheduler, (i, latents))?;
            if !on_step(i + 1 - start, total) {
                return Err(DiffusionError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// An RGB image as `[1, 3, H, W]` in `[-1, 1]` (`2 * (p / 255) - 1`, as diffusers).
    fn image_tensor(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = (img.width as usize, img.height as usize);
        let values: Vec<f32> = img
            .pixels
            .iter()
            .map(|&p| 2.0 * (f32::from(p) / 255.0) - 1.0)
            .collect();
        Ok(Tensor::from_vec(values, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// The legacy inpainting mask at latent size: `(keep, 1 - keep)`, each `[1, c, h, w]`.
    fn keep_mask(
        &self,
        mask: &RgbImage,
        (c, h, w): (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let luma = resize_nearest(&luma(mask), mask.width as usize, mask.height as usize, w, h);
        let keep: Vec<f32> = luma.iter().map(|&l| 1.0 - f32::from(l) / 255.0).collect();
        let keep = Tensor::from_vec(keep, (1, 1, h, w), &Device::Cpu)?
            .repeat((1, c, 1, 1))?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let repaint = (1.0 - &keep)?;
        Ok((keep, repaint))
    }

    /// VAE-decodes unscaled latents `[n, C, h, w]` into RGB images.
    fn decode_unscaled(&self, z: &Tensor) -> Result<Vec<RgbImage>> {
        let image = self.vae.decode(z)?.to_dtype(DType::F32)?;
        // x * 0 is NaN exactly where x is NaN or infinite, and NaN is the one value unequal
        // to itself: a poisoned output fails instead of quietly becoming black pixels.
        let diff = image.affine(0.0, 0.0)?;
        let bad = diff
            .ne(&diff)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if bad > 0.0 {
            return Err(DiffusionError::NotFinite(bad as usize));
        }
        let image = ((image / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .affine(255.0, 0.0)?
            .round()?
            .to_dtype(DType::U8)?;
        let (n, channels, height, width) = image.dims4()?;
        if channels != 3 {
            return Err(DiffusionError::InvalidInput(format!(
                "the VAE produces {channels} channels; only RGB is supported"
            )));
        }
        let to_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| DiffusionError::InvalidInput("image too large".into()))
        };
        (0..n)
            .map(|i| {
                let pixels = image
                    .get(i)?
                    .permute((1, 2, 0))?
                    .flatten_all()?
                    .to_vec1::<u8>()?;
                Ok(RgbImage {
                    width: to_u32(width)?,
                    height: to_u32(height)?,
                    pixels,
                })
            })
            .collect()
    }
}

/// Checks that an image's buffer matches its size.
fn check_image(img: &RgbImage, what: &str) -> Result<()> {
    let want = img.width as usize * img.height as usize * 3;
    if img.width == 0 || img.height == 0 || img.pixels.len() != want {
        return Err(DiffusionError::InvalidInput(format!(
            "the {what} is {}x{} but holds {} bytes (expected {want})",
            img.width,
            img.height,
            img.pixels.len()
        )));
    }
    Ok(())
}

/// ITU-R 601-2 luma as PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
pub fn luma(img: &RgbImage) -> Vec<u8> {
    img.pixels
        .chunks_exact(3)
        .map(|p| {
            let v = 19595 * u32::from(p[0]) + 38470 * u32::from(p[1]) + 7471 * u32::from(p[2]);
            ((v + 0x8000) >> 16) as u8
        })
        .collect()
}

/// Nearest-neighbour resize of a single-channel image as PIL's `Image.NEAREST`: output
/// pixel `x` samples source `floor((x + 0.5) * in / out)`.
pub fn resize_nearest(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let pick = |x: usize, out: usize, len: usize| -> usize {
        (((x as f64 + 0.5) * len as f64 / out as f64) as usize).min(len.saturating_sub(1))
    };
    let mut out = Vec::with_capacity(out_w * out_h);
    for y in 0..out_h {
        let sy = pick(y, out_h, h);
        for x in 0..out_w {
            out.push(src.get(sy * w + pick(x, out_w, w)).copied().unwrap_or(0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_resize_matches_pil() {
        // 16 -> 2: PIL samples pixels 4 and 12.
        let src: Vec<u8> = (0..16).collect();
        assert_eq!(resize_nearest(&src, 16, 1, 2, 1), vec![4, 12]);
        // 3 -> 2: floor(0.75) = 0, floor(2.25) = 2.
        assert_eq!(resize_nearest(&[10, 20, 30], 3, 1, 2, 1), vec![10, 30]);
        // Upscaling 2 -> 4.
        assert_eq!(resize_nearest(&[1, 2], 2, 1, 4, 1), vec![1, 1, 2, 2]);
    }

    #[test]
    fn luma_matches_pil() {
        let img = RgbImage {
            width: 3,
            height: 1,
            pixels: vec![255, 255, 255, 0, 0, 0, 255, 0, 0],
        };
        assert_eq!(luma(&img), vec![255, 0, 76]);
    }
}
