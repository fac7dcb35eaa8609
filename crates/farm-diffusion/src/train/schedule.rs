//! The DDPM training schedule: betas, `add_noise` and the regression target.
use candle_core::{Device, Tensor};

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::{DiffusionError, Result};

/// `alphas_cumprod` of the training schedule and what the UNet predicts.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `prod_{s <= t} (1 - beta_s)`, computed in `f32` as diffusers does.
    pub alphas_cumprod: Vec<f32>,
    pub prediction: PredictionType,
}

impl NoiseSchedule {
    /// The schedule of a model's `scheduler_config.json`: `num_train_timesteps` (default
    /// 1000) betas from `beta_start`..`beta_end` (defaults 0.00085, 0.012), `linear` or
    /// `scaled_linear` (default), and its `prediction_type` (default epsilon).
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        if n == 0 {
            return Err(DiffusionError::InvalidInput(
                "num_train_timesteps must be positive".into(),
            ));
        }
        let start = cfg.beta_start.unwrap_or(0.00085);
        let end = cfg.beta_end.unwrap_or(0.012);
        // torch.linspace(a, b, n) in float32: a + i * (b - a) / (n - 1).
        let linspace = |a: f32, b: f32| -> Vec<f32> {
            if n == 1 {
                return vec![a];
            }
            let step = (b - a) / (n - 1) as f32;
            (0..n)
                .map(|i| {
                    // torch fills the second half from the end for symmetry.
                    if i < n / 2 {
                        a + step * i as f32
                    } else {
                        b - step * (n - 1 - i) as f32
                    }
                })
                .collect()
        };
        let betas: Vec<f32> = match cfg.beta_schedule.unwrap_or(BetaSchedule::ScaledLinear) {
            BetaSchedule::Linear => linspace(start as f32, end as f32),
            // Python computes `beta ** 0.5` in double precision before the float32 linspace.
            BetaSchedule::ScaledLinear => linspace(start.sqrt() as f32, end.sqrt() as f32)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        };
        let mut acc = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(Self {
            alphas_cumprod,
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `(sqrt(abar_t), sqrt(1 - abar_t))` per timestep as `[b, 1, 1, 1]` tensors.
    fn coefficients(&self, timesteps: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let mut a = Vec::with_capacity(timesteps.len());
        let mut s = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let Some(&abar) = self.alphas_cumprod.get(t as usize) else {
                return Err(DiffusionError::InvalidInput(format!(
                    "timestep {t} outside the training schedule of {} steps",
                    self.alphas_cumprod.len()
                )));
            };
            a.push(abar.sqrt());
            s.push((1.0 - abar).sqrt());
        }
        let b = timesteps.len();
        Ok((
            Tensor::from_vec(a, (b, 1, 1, 1), device)?,
            Tensor::from_vec(s, (b, 1, 1, 1), device)?,
        ))
    }

    /// DDPM forward process: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0.device())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// What the UNet must predict: the noise, or the velocity
    /// `sqrt(abar_t) noise - sqrt(1 - abar_t) x0` for v-prediction models.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => {
                let (a, s) = self.coefficients(timesteps, x0.device())?;
                Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
            }
        }
    }
}
