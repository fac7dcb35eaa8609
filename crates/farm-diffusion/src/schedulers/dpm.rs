//! DPM-Solver++ 2M: `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`,
//! `solver_order = 2`, `solver_type = "midpoint"`, `lower_order_final = true`,
//! `final_sigmas_type = "zero"` (diffusers' defaults; default spacing `"linspace"`).
use candle_core::Tensor;

use super::{lin2, Common, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::Result;

pub struct DpmSolverMultistep {
    common: Common,
    timesteps: Vec<f64>,
    /// One per timestep, then a final 0.
    sigmas: Vec<f64>,
    /// Converted (x0) model outputs of the last two steps, newest last.
    outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` from the VE sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha) - log(sigma)` (infinite for sigma = 0).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let common = Common::new(cfg, TimestepSpacing::Linspace);
        let n = common.num_train_timesteps;
        let ts: Vec<i64> = match common.spacing {
            // linspace(0, N - 1, steps + 1).round()[::-1][:-1]
            TimestepSpacing::Linspace => super::linspace(0.0, (n - 1) as f64, steps + 1)
                .into_iter()
                .skip(1)
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            // (arange(0, steps + 1) * (N // (steps + 1)))[::-1][:-1] + offset
            TimestepSpacing::Leading => {
                let ratio = n / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + common.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let mut sigmas: Vec<f64> = ts
            .iter()
            .map(|&t| {
                let a = common.alpha_prod(t, 1.0);
                ((1.0 - a) / a).sqrt()
            })
            .collect();
        sigmas.push(0.0);
        Self {
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
            sigmas,
            common,
            outputs: [None, None],
            lower_order_nums: 0,
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let n = self.timesteps.len();
        // With final_sigmas_type "zero" the last step is always first order. (diffusers'
        // `lower_order_second` only matters for third order, which is not used here.)
        let lower_order_final = index == n - 1;

        // convert_model_output: data (x0) prediction.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let x0 = match self.common.prediction {
            PredictionType::Epsilon => {
                lin2(sample, 1.0 / alpha_s0, model_output, -sigma_s0 / alpha_s0)?
            }
            PredictionType::VPrediction => lin2(sample, alpha_s0, model_output, -sigma_s0)?,
        };
        self.outputs[0] = self.outputs[1].take();
        self.outputs[1] = Some(x0.clone());

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let ratio = if sigma_s0 > 0.0 {
            sigma_t / sigma_s0
        } else {
            0.0
        };
        let coeff = -alpha_t * ((-h).exp() - 1.0);

        let second = match &self.outputs[0] {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final && index >= 1 => {
                Some(m1.clone())
            }
            _ => None,
        };
        let prev = match second {
            None => lin2(sample, ratio, &x0, coeff)?,
            Some(m1) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
                let h0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h0 / h;
                // D0 = m0, D1 = (m0 - m1) / r0; x = ratio*x + coeff*D0 + 0.5*coeff*D1
                let d1 = ((&x0 - &m1)? / r0)?;
                (lin2(sample, ratio, &x0, coeff)? + (d1 * (0.5 * coeff))?)?
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        lin2(original, alpha, noise, sigma)
    }
}
