//! Euler ancestral (`EulerAncestralDiscreteScheduler`), default spacing `"linspace"`.
//!
//! Model input is scaled by `(sigma^2 + 1)^-0.5`; `init_noise_sigma` is the largest sigma
//! (or `sqrt(max^2 + 1)` for `"leading"` spacing). Each step adds fresh noise drawn from
//! `ChaCha8Rng::seed_from_u64(seed)` on stream 1, sampled on the CPU as `f32` in row-major
//! order; in a batch, image `i` draws from its own seed's generator.
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{Common, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::Result;

pub struct EulerAncestral {
    common: Common,
    timesteps: Vec<f64>,
    /// One per timestep, then a final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    /// One generator per image of the batch.
    rngs: Vec<ChaCha8Rng>,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize, seeds: &[u64]) -> Self {
        let common = Common::new(cfg, TimestepSpacing::Linspace);
        let n = common.num_train_timesteps;
        let timesteps: Vec<f64> = match common.spacing {
            TimestepSpacing::Linspace => super::linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + common.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
        };
        let base: Vec<f64> = common
            .alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        // numpy.interp(timesteps, arange(N), base)
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let t = t.clamp(0.0, (n - 1) as f64);
                let lo = t.floor() as usize;
                let hi = (lo + 1).min(n - 1);
                let w = t - lo as f64;
                base[lo] * (1.0 - w) + base[hi] * w
            })
            .collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match common.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        let rngs = seeds
            .iter()
            .map(|&seed| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(1);
                rng
            })
            .collect();
        Self {
            common,
            timesteps,
            sigmas,
            init_noise_sigma,
            rngs,
        }
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: Tensor, index: usize) -> Result<Tensor> {
        let s = self.sigmas[index];
        Ok((sample / (s * s + 1.0).sqrt())?)
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let x0 = match self.common.prediction {
            PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
            PredictionType::VPrediction => {
                let k = sigma * sigma + 1.0;
                super::lin2(model_output, -sigma / k.sqrt(), sample, 1.0 / k)?
            }
        };
        let sigma_to = self.sigmas[index + 1];
        let sigma_up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to)
            / (sigma * sigma))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        // prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        let derivative = ((sample - &x0)? / sigma)?;
        let prev = (sample + (derivative * (sigma_down - sigma))?)?;
        let shape = sample.shape().clone();
        let batch = shape.dims().first().copied().unwrap_or(1);
        if batch != self.rngs.len() {
            return Err(crate::DiffusionError::InvalidInput(format!(
                "euler-a: batch of {batch} samples but {} seeds",
                self.rngs.len()
            )));
        }
        let per_image = shape.elem_count() / batch.max(1);
        let noise: Vec<f32> = self
            .rngs
            .iter_mut()
            .flat_map(|rng| {
                (0..per_image)
                    .map(|_| rng.sample::<f32, _>(StandardNormal))
                    .collect::<Vec<_>>()
            })
            .collect();
        let noise = Tensor::from_vec(noise, shape, &Device::Cpu)?
            .to_device(sample.device())?
            .to_dtype(sample.dtype())?;
        Ok((prev + (noise * sigma_up)?)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        Ok((original + (noise * self.sigmas[index])?)?)
    }
}
