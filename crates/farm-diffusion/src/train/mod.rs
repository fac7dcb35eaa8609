//! Fine-tuning the UNet on image–caption data (diffusers' `train_text_to_image` recipe).
//!
//! * The VAE and the CLIP text encoder are frozen. Images are encoded once, their posterior
//!   (mean, std) cached, and sampled every step (`(mean + std * eps) * scaling_factor`);
//!   captions are encoded to 77 tokens.
//! * Timesteps are uniform over the training schedule (`num_train_timesteps` betas from the
//!   model's `scheduler_config.json`, `scaled_linear` by default); DDPM `add_noise`; the
//!   loss is the MSE (mean over all elements) between the UNet's prediction and the noise,
//!   or the velocity for `v_prediction` models.
//! * AdamW with PyTorch's formula and defaults ([`optim`]), constant learning rate, no
//!   gradient clipping, `f32` throughout.
//! * The UNet is [`unet::TrainUNet`]: candle 0.11's fused softmax and LayerNorm have no
//!   backward pass, so the training UNet is built from differentiable primitives
//!   ([`nn`]); every tensor of `unet/diffusion_pytorch_model.safetensors` is trained.
//!
//! # Parity
//!
//! `tests/train_parity.rs` runs two steps from the fixtures of
//! `scripts/parity/train_fixtures.py` (diffusers' UNet + `torch.optim.AdamW`, an SD 1.x
//! layout with epsilon prediction and an SD 2.x layout with linear projections and
//! v-prediction): losses agree to ~1e-7 relative, gradients to ~5e-6 (per-tensor norm),
//! updated weights to ~3e-5 element-wise (bar: 1e-4).
//!
//! # Randomness
//!
//! Everything is drawn on the CPU from `rand_chacha::ChaCha8Rng::seed_from_u64(seed)`; the
//! generator is *counter-based*: its stream is chosen by what is drawn, so the whole RNG
//! state is `(seed, step)` and resuming continues exactly.
//!
//! * **Data order**: epoch `e` (0, 1, ...) is a permutation of the examples, a Fisher–Yates
//!   shuffle (`for i in (1..n).rev() { j = gen_range(0..=i); swap(i, j) }`) of `0..n` drawn
//!   on stream `u64::MAX - e`. Step `s` (0-based) takes positions `s*B .. s*B + B` of the
//!   concatenated epochs.
//! * **Step `s`** draws on stream `s`, in this order: `B` timesteps
//!   (`gen_range(0..num_train_timesteps)` as `u32`), the noise `[B, C, h, w]`, then the VAE
//!   posterior noise `[B, C, h, w]` (standard normal `f32`, one value at a time, row-major).
//!
//! # Using it
//!
//! ```no_run
//! # use farm_diffusion::train::{TrainConfig, Trainer};
//! # fn main() -> farm_diffusion::Result<()> {
//! let cfg = TrainConfig::new("models/base", "data/cats");
//! let mut trainer = Trainer::new(&cfg, &farm_diffusion::Device::Cpu)?;
//! // trainer.resume(Path::new("out/checkpoint-100"))?;     // optional
//! while trainer.step_count() < 1000 {
//!     let report = trainer.step()?;                        // {step, loss}
//!     if report.step % 100 == 0 {
//!         trainer.save_checkpoint(&std::path::Path::new("out").join(format!("checkpoint-{}", report.step)))?;
//!     }
//! }
//! trainer.save_model(std::path::Path::new("out"))?;
//! # Ok(()) }
//! ```
//!
//! A checkpoint folder holds `unet/` (config and safetensors with diffusers names),
//! `optimizer.safetensors` (`{name}.exp_avg`, `{name}.exp_avg_sq`) and
//! `trainer_state.json` (step, optimizer step, seed, batch size, resolution, dataset size).
pub mod data;
pub mod nn;
pub mod optim;
pub mod schedule;
pub mod unet;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::json;

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, JsonFile, SchedulerConfig, UNetConfig, VaeConfig};
use crate::tokenizer::{Tokenizer, MAX_LEN};
use crate::vae::Vae;
use crate::{DiffusionError, Result};
pub use data::Dataset;
pub use optim::{AdamW, AdamWConfig};
pub use schedule::NoiseSchedule;
pub use unet::TrainUNet;

/// The format tag of `trainer_state.json`.
pub const CHECKPOINT_FORMAT: &str = "farm-train/1";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
/// Largest accepted resolution and batch.
pub const MAX_RESOLUTION: usize = 4096;
pub const MAX_BATCH: usize = 256;

/// What to train on, and how.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The base model (diffusers layout).
    pub model: PathBuf,
    /// The dataset folder ([`data`]).
    pub data: PathBuf,
    pub batch_size: usize,
    /// Square training size in pixels, a multiple of 8; `None`: the UNet's `sample_size`
    /// times the VAE scale factor (512 for SD 1.5).
    pub resolution: Option<usize>,
    pub seed: u64,
    pub adamw: AdamWConfig,
}

impl TrainConfig {
    /// Batch size 1, the model's resolution, seed 0, AdamW defaults (lr 1e-4).
    pub fn new(model: impl Into<PathBuf>, data: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            data: data.into(),
            batch_size: 1,
            resolution: None,
            seed: 0,
            adamw: AdamWConfig::default(),
        }
    }
}

/// The result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps completed, counting this one (1 after the first step).
    pub step: u64,
    /// The batch's MSE loss before the update.
    pub loss: f32,
}

/// `ChaCha8Rng::seed_from_u64(seed)` on `stream`.
pub fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// The example indices of step `step` (0-based): see the module docs.
pub fn batch_indices(seed: u64, n: usize, batch: usize, step: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut epoch_cache: Option<(u64, Vec<usize>)> = None;
    let start = step as u128 * batch as u128;
    for k in 0..batch as u128 {
        let pos = start + k;
        let epoch = (pos / n as u128) as u64;
        let within = (pos % n as u128) as usize;
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut r = rng(seed, u64::MAX - epoch);
            for i in (1..n).rev() {
                let j = r.gen_range(0..=i);
                perm.swap(i, j);
            }
            epoch_cache = Some((epoch, perm));
        }
        if let Some((_, perm)) = &epoch_cache {
            out.push(perm[within]);
        }
    }
    out
}

/// The UNet, its optimizer and the noise schedule: one training step on given latents,
/// embeddings, timesteps and noise. [`Trainer`] adds the data and frozen encoders.
pub struct UNetTrainer {
    params: nn::Params,
    unet: TrainUNet,
    config: UNetConfig,
    pub optimizer: AdamW,
    pub schedule: NoiseSchedule,
}

impl UNetTrainer {
    /// From diffusers-named tensors (any float dtype; trained in `f32`).
    pub fn new(
        config: UNetConfig,
        tensors: HashMap<String, Tensor>,
        schedule: NoiseSchedule,
        adamw: AdamWConfig,
    ) -> Result<Self> {
        let params = nn::Params::new(tensors)?;
        let unet = TrainUNet::new(&params, &config)
            .map_err(|e| DiffusionError::model(UNET_WEIGHTS, e.to_string()))?;
        Ok(Self {
            params,
            unet,
            config,
            optimizer: AdamW::new(adamw)?,
            schedule,
        })
    }

    /// From a `unet/` folder (`config.json`, `diffusion_pytorch_model.safetensors`).
    pub fn load(
        unet_dir: &Path,
        schedule: NoiseSchedule,
        adamw: AdamWConfig,
        device: &Device,
    ) -> Result<Self> {
        let config = UNetConfig::from_json(&JsonFile::read(&unet_dir.join("config.json"))?)?;
        let path = unet_dir.join("diffusion_pytorch_model.safetensors");
        let tensors = read_safetensors(&path, device)?;
        Self::new(config, tensors, schedule, adamw).map_err(|e| relabel(e, &path))
    }

    pub fn unet(&self) -> &TrainUNet {
        &self.unet
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The trainable tensors by diffusers name.
    pub fn params(&self) -> &nn::Params {
        &self.params
    }

    /// The loss (a scalar tensor in the autograd graph) for scaled latents `x0`
    /// `[b, c, h, w]`, text embeddings `[b, 77, d]`, one timestep per image and `noise`.
    pub fn loss(
        &self,
        x0: &Tensor,
        context: &Tensor,
        timesteps: &[u32],
        noise: &Tensor,
    ) -> Result<Tensor> {
        let noisy = self.schedule.add_noise(x0, noise, timesteps)?;
        let pred = self.unet.forward(&noisy, timesteps, context)?;
        let target = self.schedule.target(x0, noise, timesteps)?;
        Ok((pred - target)?.sqr()?.mean_all()?)
    }

    /// Loss, backward pass and one AdamW update; returns the loss before the update.
    pub fn step(
        &mut self,
        x0: &Tensor,
        context: &Tensor,
        timesteps: &[u32],
        noise: &Tensor,
    ) -> Result<f32> {
        let loss = self.loss(x0, context, timesteps, noise)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(DiffusionError::InvalidInput(format!(
                "the loss is {value}; training diverged (try a lower learning rate)"
            )));
        }
        let grads = loss.backward()?;
        self.optimizer.step(self.params.vars(), &grads)?;
        Ok(value)
    }

    /// Writes the UNet weights (diffusers names, `f32`) to `path`.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self.params.snapshot()?.into_iter().collect();
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Overwrites the weights from a safetensors file with exactly the same names/shapes.
    pub fn load_weights(&self, path: &Path, device: &Device) -> Result<()> {
        let mut tensors = read_safetensors(path, device)?;
        for (name, var) in self.params.vars() {
            let t = tensors
                .remove(name)
                .ok_or_else(|| DiffusionError::model(path, format!("missing tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(DiffusionError::model(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(DiffusionError::model(
                path,
                format!("unexpected tensor `{extra}`"),
            ));
        }
        Ok(())
    }
}

fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(DiffusionError::model(path, "missing weights file"));
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| DiffusionError::model(path, format!("cannot read safetensors: {e}")))
}

/// Attaches the file name to a model error raised while building from its tensors.
fn relabel(e: DiffusionError, path: &Path) -> DiffusionError {
    match e {
        DiffusionError::Model { message, .. } => DiffusionError::model(path, message),
        other => other,
    }
}

fn frozen_weights(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    if !path.is_file() {
        return Err(DiffusionError::model(path, "missing weights file"));
    }
    // SAFETY: read-only memory map of a model file; model folders are treated as immutable
    // while loaded (as in `pipeline`).
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
        .map_err(|e| DiffusionError::model(path, format!("cannot read safetensors: {e}")))
}

/// Cached per-example encodings: posterior mean and std `[1, C, h, w]` (unscaled) and the
/// caption's embeddings `[1, 77, d]`.
struct Encoded {
    mean: Tensor,
    std: Tensor,
    context: Tensor,
}

/// The whole training job: frozen encoders, dataset, UNet and optimizer.
///
/// `Send`: run it on a blocking thread. Call [`step`](Self::step) in a loop, checking for
/// cancellation between steps, or use [`run`](Self::run).
pub struct Trainer {
    device: Device,
    config: TrainConfig,
    resolution: usize,
    latent: (usize, usize, usize),
    dataset: Dataset,
    tokenizer: Tokenizer,
    text_encoder: ClipTextModel,
    vae: Vae,
    core: UNetTrainer,
    step: u64,
    cache: HashMap<usize, Encoded>,
}

impl Trainer {
    /// Loads the base model (VAE and text encoder frozen, UNet trainable) and checks the
    /// dataset and the configuration.
    pub fn new(config: &TrainConfig, device: &Device) -> Result<Self> {
        let dir = &config.model;
        let p = |s: &str| dir.join(s);
        if !(1..=MAX_BATCH).contains(&config.batch_size) {
            return Err(DiffusionError::InvalidInput(format!(
                "batch size must be between 1 and {MAX_BATCH}, got {}",
                config.batch_size
            )));
        }
        config.adamw.validate()?;
        let unet_json = JsonFile::read(&p("unet/config.json"))?;
        let vae_config = VaeConfig::from_json(&JsonFile::read(&p("vae/config.json"))?)?;
        let text_config =
            ClipTextConfig::from_json(&JsonFile::read(&p("text_encoder/config.json"))?)?;
        let scheduler_config =
            SchedulerConfig::from_json(&JsonFile::read(&p("scheduler/scheduler_config.json"))?)?;
        let factor = vae_config.scale_factor();
        let resolution = match config.resolution {
            Some(r) => r,
            None => unet_json.positive_or("sample_size", 64)? * factor,
        };
        if resolution == 0 || !resolution.is_multiple_of(8) || resolution > MAX_RESOLUTION {
            return Err(DiffusionError::InvalidInput(format!(
                "resolution must be a positive multiple of 8 up to {MAX_RESOLUTION}, got {resolution}"
            )));
        }
        let dataset = Dataset::open(&config.data)?;
        let tokenizer = Tokenizer::load(&p("tokenizer"))?;
        let path = p("text_encoder/model.safetensors");
        let text_encoder = ClipTextModel::new(frozen_weights(&path, device)?, &text_config)
            .map_err(|e| DiffusionError::model(&path, format!("cannot build model: {e}")))?;
        let path = p("vae/diffusion_pytorch_model.safetensors");
        let vae = Vae::new(frozen_weights(&path, device)?, &vae_config)
            .map_err(|e| DiffusionError::model(&path, format!("cannot build model: {e}")))?;
        let schedule = NoiseSchedule::from_config(&scheduler_config)?;
        let core = UNetTrainer::load(&p("unet"), schedule, config.adamw, device)?;
        if core.config.candle.cross_attention_dim != text_config.hidden_size {
            return Err(DiffusionError::model(
                p("unet/config.json"),
                "cross_attention_dim does not match the text encoder's hidden_size",
            ));
        }
        let side = resolution / factor;
        let m = 1usize << core.unet.downsamples();
        if side == 0 || !side.is_multiple_of(m) || !resolution.is_multiple_of(factor) {
            return Err(DiffusionError::InvalidInput(format!(
                "resolution {resolution} is not usable with this model: it must be a multiple \
                 of {} (VAE scale factor {factor} times the UNet's {m}x downsampling)",
                factor * m
            )));
        }
        Ok(Self {
            device: device.clone(),
            config: config.clone(),
            resolution,
            latent: (core.config.in_channels, side, side),
            dataset,
            tokenizer,
            text_encoder,
            vae,
            core,
            step: 0,
            cache: HashMap::new(),
        })
    }

    /// Steps completed so far (after [`resume`](Self::resume): the checkpoint's).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn resolution(&self) -> usize {
        self.resolution
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The UNet, optimizer and schedule.
    pub fn unet_trainer(&self) -> &UNetTrainer {
        &self.core
    }

    fn encoded(&mut self, index: usize) -> Result<&Encoded> {
        if !self.cache.contains_key(&index) {
            let example = &self.dataset.examples[index];
            let image = data::load_image(&example.image, self.resolution, &self.device)?;
            let posterior = self.vae.encode(&image.unsqueeze(0)?)?;
            let ids = Tensor::from_vec(
                self.tokenizer.encode(&example.caption),
                (1, MAX_LEN),
                &self.device,
            )?;
            let context = self.text_encoder.forward(&ids)?.to_dtype(DType::F32)?;
            self.cache.insert(
                index,
                Encoded {
                    mean: posterior.mean.detach(),
                    std: posterior.std.detach(),
                    context: context.detach(),
                },
            );
        }
        self.cache
            .get(&index)
            .ok_or_else(|| DiffusionError::InvalidInput("encoding cache miss".into()))
    }

    /// The inputs of step `step` (0-based): scaled latents, text embeddings, timesteps and
    /// noise. Exposed for tests and debugging; [`step`](Self::step) uses it.
    pub fn batch_inputs(&mut self, step: u64) -> Result<(Tensor, Tensor, Vec<u32>, Tensor)> {
        let b = self.config.batch_size;
        let (c, h, w) = self.latent;
        let seed = self.config.seed;
        let indices = batch_indices(seed, self.dataset.len(), b, step);
        let mut r = rng(seed, step);
        let t_max = self.core.schedule.num_train_timesteps() as u32;
        let timesteps: Vec<u32> = (0..b).map(|_| r.gen_range(0..t_max)).collect();
        let n = b * c * h * w;
        let mut normal =
            |n: usize| -> Vec<f32> { (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect() };
        let noise = normal(n);
        let vae_noise = normal(n);
        let noise = Tensor::from_vec(noise, (b, c, h, w), &Device::Cpu)?.to_device(&self.device)?;
        let vae_noise =
            Tensor::from_vec(vae_noise, (b, c, h, w), &Device::Cpu)?.to_device(&self.device)?;
        let sf = self.vae.config.scaling_factor;
        let mut latents = Vec::with_capacity(b);
        let mut contexts = Vec::with_capacity(b);
        for (i, &idx) in indices.iter().enumerate() {
            let e = self.encoded(idx)?;
            let z = (&e.mean + (&e.std * vae_noise.narrow(0, i, 1)?)?)?;
            latents.push((z * sf)?);
            contexts.push(e.context.clone());
        }
        Ok((
            Tensor::cat(&latents, 0)?,
            Tensor::cat(&contexts, 0)?,
            timesteps,
            noise,
        ))
    }

    /// One optimizer step on the next batch.
    pub fn step(&mut self) -> Result<StepReport> {
        let (x0, context, timesteps, noise) = self.batch_inputs(self.step)?;
        let loss = self.core.step(&x0, &context, &timesteps, &noise)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss,
        })
    }

    /// Runs steps until `total_steps` are done. After each step `on_step(report)` runs;
    /// returning `false` stops with [`DiffusionError::Cancelled`] (the weights then hold
    /// the last completed step; save a checkpoint if needed). With `checkpoint_every = K`
    /// a checkpoint is written to `output/checkpoint-{step}` every K steps. Ends by
    /// writing the model folder to `output` ([`save_model`](Self::save_model)).
    pub fn run(
        &mut self,
        total_steps: u64,
        output: &Path,
        checkpoint_every: Option<u64>,
        on_step: &mut dyn FnMut(&StepReport) -> bool,
    ) -> Result<()> {
        while self.step < total_steps {
            let report = self.step()?;
            if let Some(k) = checkpoint_every.filter(|&k| k > 0) {
                if report.step % k == 0 {
                    self.save_checkpoint(&checkpoint_dir(output, report.step))?;
                }
            }
            if !on_step(&report) {
                return Err(DiffusionError::Cancelled);
            }
        }
        self.save_model(output)
    }

    /// Writes a checkpoint folder (replacing one that exists) atomically: it is written
    /// next to `dir` and renamed into place.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let tmp = sibling(dir, ".tmp")?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(tmp.join("unet"))?;
        std::fs::copy(
            self.config.model.join("unet/config.json"),
            tmp.join("unet/config.json"),
        )?;
        self.core.save_weights(&tmp.join(UNET_WEIGHTS))?;
        let mut moments: HashMap<String, Tensor> = HashMap::new();
        for (name, (m, v)) in &self.core.optimizer.moments {
            moments.insert(format!("{name}.exp_avg"), m.clone());
            moments.insert(format!("{name}.exp_avg_sq"), v.clone());
        }
        candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
        let a = self.core.optimizer.config;
        let state = json!({
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "optimizer_step": self.core.optimizer.step,
            "seed": self.config.seed,
            "rng": "chacha8, counter-based: stream = step for step draws, u64::MAX - epoch for data order",
            "batch_size": self.config.batch_size,
            "resolution": self.resolution,
            "dataset_len": self.dataset.len(),
            "adamw": {"lr": a.lr, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps, "weight_decay": a.weight_decay},
        });
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| DiffusionError::InvalidInput(format!("cannot serialise JSON: {e}")))?;
        std::fs::write(tmp.join("trainer_state.json"), text + "\n")?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        Ok(())
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint):
    /// weights, optimizer moments and step, step count and seed. The batch size,
    /// resolution and dataset size must be the checkpoint's; AdamW hyper-parameters are
    /// this trainer's (so the learning rate may be changed).
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join("trainer_state.json");
        let state = JsonFile::read(&state_path)?;
        let format = state.string_or("format", "")?;
        if format != CHECKPOINT_FORMAT {
            return Err(DiffusionError::model(
                &state_path,
                format!("key `format`: expected {CHECKPOINT_FORMAT:?}, got {format:?}"),
            ));
        }
        let u64_key = |k: &str| -> Result<u64> {
            state.value(k).and_then(|v| v.as_u64()).ok_or_else(|| {
                DiffusionError::model(
                    &state_path,
                    format!("key `{k}`: expected an unsigned integer"),
                )
            })
        };
        for (key, ours) in [
            ("batch_size", self.config.batch_size as u64),
            ("resolution", self.resolution as u64),
            ("dataset_len", self.dataset.len() as u64),
        ] {
            let theirs = u64_key(key)?;
            if theirs != ours {
                return Err(DiffusionError::InvalidInput(format!(
                    "cannot resume from {}: it was trained with {key} {theirs}, this run has {ours}",
                    dir.display()
                )));
            }
        }
        let step = u64_key("step")?;
        let optimizer_step = u64_key("optimizer_step")?;
        let seed = u64_key("seed")?;
        self.core
            .load_weights(&dir.join(UNET_WEIGHTS), &self.device)?;
        let opt_path = dir.join("optimizer.safetensors");
        let mut tensors = read_safetensors(&opt_path, &self.device)?;
        let mut moments = BTreeMap::new();
        for (name, var) in self.core.params.vars() {
            let mut take = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors.remove(&key).ok_or_else(|| {
                    DiffusionError::model(&opt_path, format!("missing tensor `{key}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(DiffusionError::model(
                        &opt_path,
                        format!("tensor `{key}` has the wrong shape"),
                    ));
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let m = take("exp_avg");
            let v = take("exp_avg_sq");
            match (m, v) {
                (Ok(m), Ok(v)) => {
                    moments.insert(name.clone(), (m, v));
                }
                // A checkpoint taken before the first step has no moments.
                (Err(_), Err(_)) if optimizer_step == 0 => {}
                (Err(e), _) | (_, Err(e)) => return Err(e),
            }
        }
        self.core.optimizer.moments = moments;
        self.core.optimizer.step = optimizer_step;
        self.config.seed = seed;
        self.step = step;
        Ok(())
    }

    /// Writes a complete diffusers-layout model folder into `dir`: the fine-tuned UNet and
    /// every other part copied from the base model. `model_index.json` is written last, so
    /// a folder without it is incomplete.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let base = &self.config.model;
        if same_dir(base, dir) {
            return Err(DiffusionError::InvalidInput(format!(
                "the output folder {} is the base model's folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join("model_index.json"));
        for entry in std::fs::read_dir(base)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == "unet" || name == "model_index.json" {
                continue;
            }
            copy_recursive(&entry.path(), &dir.join(&name))?;
        }
        std::fs::create_dir_all(dir.join("unet"))?;
        std::fs::copy(base.join("unet/config.json"), dir.join("unet/config.json"))?;
        let weights = dir.join(UNET_WEIGHTS);
        let tmp = weights.with_extension("safetensors.tmp");
        self.core.save_weights(&tmp)?;
        std::fs::rename(&tmp, &weights)?;
        std::fs::copy(base.join("model_index.json"), dir.join("model_index.json"))?;
        Ok(())
    }
}

/// `output/checkpoint-{step}`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        DiffusionError::InvalidInput(format!("bad checkpoint folder {}", dir.display()))
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(suffix);
    Ok(dir.with_file_name(tmp))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn copy_recursive(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_recursive(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(from, to)?;
    }
    Ok(())
}
