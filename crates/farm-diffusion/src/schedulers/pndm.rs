//! PNDM with `skip_prk_steps` = PLMS (pseudo linear multistep), SD 1.x's default sampler.
//!
//! diffusers' defaults: `set_alpha_to_one = false`, `timestep_spacing = "leading"`. The
//! timestep list has `steps + 1` entries: the second step re-evaluates the first timestep
//! to start the multistep history.
use candle_core::Tensor;

use super::{lin2, Common, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::Result;

pub struct Pndm {
    common: Common,
    final_alpha_cumprod: f64,
    step_ratio: i64,
    timesteps: Vec<f64>,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let common = Common::new(cfg, TimestepSpacing::Leading);
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            common.alphas_cumprod[0]
        };
        let asc = common.ascending_int_timesteps(steps);
        // plms = concat(ts[:-1], ts[-2:-1], ts[-1:])[::-1]
        let mut plms: Vec<i64> = asc[..asc.len() - 1].to_vec();
        if asc.len() >= 2 {
            plms.push(asc[asc.len() - 2]);
        }
        plms.push(asc[asc.len() - 1]);
        plms.reverse();
        Self {
            step_ratio: (common.num_train_timesteps / steps) as i64,
            final_alpha_cumprod,
            timesteps: plms.into_iter().map(|t| t as f64).collect(),
            common,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        }
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.common.alpha_prod(t, self.final_alpha_cumprod);
        let a_prev = self.common.alpha_prod(prev_t, self.final_alpha_cumprod);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = match self.common.prediction {
            PredictionType::Epsilon => eps.clone(),
            PredictionType::VPrediction => lin2(eps, a_t.sqrt(), sample, b_t.sqrt())?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lin2(sample, sample_coeff, &eps, -(a_prev - a_t) / denom)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let mut t = self.timesteps[index] as i64;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let n = self.ets.len();
        let e = |k: usize| &self.ets[n - k];
        let (eps, sample) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            (model_output.clone(), sample.clone())
        } else if n == 1 && self.counter == 1 {
            let s = self.cur_sample.take().unwrap_or_else(|| sample.clone());
            (((model_output + e(1))? * 0.5)?, s)
        } else if n == 2 {
            (lin2(e(1), 1.5, e(2), -0.5)?, sample.clone())
        } else if n == 3 {
            let x = (lin2(e(1), 23.0, e(2), -16.0)? + (e(3) * 5.0)?)?;
            ((x / 12.0)?, sample.clone())
        } else {
            let x = (lin2(e(1), 55.0, e(2), -59.0)? + lin2(e(3), 37.0, e(4), -9.0)?)?;
            ((x / 24.0)?, sample.clone())
        };
        let prev = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.common
            .add_noise_at(original, noise, self.timesteps[index])
    }
}
