//! DDIM with eta = 0 (deterministic).
//!
//! diffusers' defaults: `set_alpha_to_one = true`, `timestep_spacing = "leading"`.
//! `clip_sample` is read from the config but defaults to off here (diffusers defaults it on;
//! SD configs set it off).
use candle_core::Tensor;

use super::{lin2, Common, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::Result;

pub struct Ddim {
    common: Common,
    final_alpha_cumprod: f64,
    step_ratio: i64,
    clip_sample: Option<f64>,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let common = Common::new(cfg, TimestepSpacing::Leading);
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            common.alphas_cumprod[0]
        };
        let timesteps = common
            .ascending_int_timesteps(steps)
            .into_iter()
            .rev()
            .map(|t| t as f64)
            .collect();
        Self {
            step_ratio: (common.num_train_timesteps / steps) as i64,
            final_alpha_cumprod,
            clip_sample: cfg
                .clip_sample
                .unwrap_or(false)
                .then(|| cfg.clip_sample_range.unwrap_or(1.0)),
            timesteps,
            common,
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[index] as i64;
        let prev_t = t - self.step_ratio;
        let a_t = self.common.alpha_prod(t, self.final_alpha_cumprod);
        let a_prev = self.common.alpha_prod(prev_t, self.final_alpha_cumprod);
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.common.prediction {
            PredictionType::Epsilon => (
                lin2(
                    sample,
                    1.0 / a_t.sqrt(),
                    model_output,
                    -b_t.sqrt() / a_t.sqrt(),
                )?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                lin2(sample, a_t.sqrt(), model_output, -b_t.sqrt())?,
                lin2(model_output, a_t.sqrt(), sample, b_t.sqrt())?,
            ),
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        // eta = 0: no variance term.
        lin2(&x0, a_prev.sqrt(), &eps, (1.0 - a_prev).sqrt())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.common
            .add_noise_at(original, noise, self.timesteps[index])
    }
}
