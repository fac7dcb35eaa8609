//! Samplers, following diffusers' formulas.
//!
//! * [`pndm::Pndm`] — `PNDMScheduler` with `skip_prk_steps` (PLMS).
//! * [`ddim::Ddim`] — `DDIMScheduler`, eta = 0.
//! * [`dpm::DpmSolverMultistep`] — `DPMSolverMultistepScheduler`, DPM-Solver++ 2M, midpoint,
//!   `lower_order_final`, final sigma zero.
//! * [`euler_a::EulerAncestral`] — `EulerAncestralDiscreteScheduler`.
//!
//! Betas come from `scheduler_config.json`; keys that are missing take each scheduler's own
//! diffusers default. Coefficients are computed in `f64` (diffusers uses `float32`), so
//! results may differ from diffusers in the last bits.
use candle_core::Tensor;

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{DiffusionError, Result, SchedulerKind};

pub mod ddim;
pub mod dpm;
pub mod euler_a;
pub mod pndm;

/// One denoising run. A scheduler is created per request and holds that run's state.
pub trait Scheduler: Send {
    /// The UNet timesteps, one per denoising step, in order.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the UNet input for step `index` (identity except for Euler ancestral).
    fn scale_model_input(&self, sample: Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample)
    }
    /// Computes the sample of the next step from the model output at step `index`.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor>;
    /// Noises a clean sample to the noise level of step `index` (diffusers' `add_noise` at
    /// `timesteps[index]`): `sqrt(a) x0 + sqrt(1 - a) noise` for the DDPM-style samplers,
    /// `x0 + sigma noise` for Euler ancestral.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}

/// Builds the scheduler of `kind` for `steps` inference steps. `seed` feeds the per-step
/// noise of ancestral samplers.
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    steps: usize,
    seed: u64,
) -> Result<Box<dyn Scheduler>> {
    build_batch(kind, cfg, steps, &[seed])
}

/// Like [`build`] for a batch: image `i` of the batch draws its ancestral noise from
/// `seeds[i]`, so every image is the same as when run alone.
pub fn build_batch(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    steps: usize,
    seeds: &[u64],
) -> Result<Box<dyn Scheduler>> {
    if seeds.is_empty() {
        return Err(DiffusionError::InvalidInput(
            "a batch needs at least one seed".into(),
        ));
    }
    let train = cfg.num_train_timesteps.unwrap_or(1000);
    if steps == 0 || steps >= train {
        return Err(DiffusionError::InvalidInput(format!(
            "steps must be between 1 and {} (got {steps})",
            train - 1
        )));
    }
    let scheduler: Box<dyn Scheduler> = match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(cfg, steps)),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(cfg, steps)),
        SchedulerKind::DpmSolverMultistep => Box::new(dpm::DpmSolverMultistep::new(cfg, steps)),
        SchedulerKind::EulerAncestral => Box::new(euler_a::EulerAncestral::new(cfg, steps, seeds)),
    };
    Ok(scheduler)
}

/// The settings shared by all schedulers, with defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub alphas_cumprod: Vec<f64>,
    pub num_train_timesteps: usize,
    pub steps_offset: usize,
    pub spacing: TimestepSpacing,
    pub prediction: PredictionType,
}

impl Common {
    /// diffusers' common defaults: betas 0.0001..0.02 linear, 1000 train steps, offset 0,
    /// epsilon prediction; `spacing` is the scheduler's default spacing.
    pub fn new(cfg: &SchedulerConfig, default_spacing: TimestepSpacing) -> Self {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        let start = cfg.beta_start.unwrap_or(0.0001);
        let end = cfg.beta_end.unwrap_or(0.02);
        let betas: Vec<f64> = match cfg.beta_schedule.unwrap_or(BetaSchedule::Linear) {
            BetaSchedule::Linear => linspace(start, end, n),
            BetaSchedule::ScaledLinear => linspace(start.sqrt(), end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self {
            alphas_cumprod,
            num_train_timesteps: n,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            spacing: cfg.timestep_spacing.unwrap_or(default_spacing),
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
        }
    }

    /// `alphas_cumprod[t]`, `final` for negative `t`, clamped to the last entry above.
    pub fn alpha_prod(&self, t: i64, final_alpha: f64) -> f64 {
        if t < 0 {
            return final_alpha;
        }
        let i = usize::try_from(t).unwrap_or(usize::MAX);
        self.alphas_cumprod[i.min(self.alphas_cumprod.len() - 1)]
    }

    /// `sqrt(a) * x0 + sqrt(1 - a) * noise` with `a = alphas_cumprod[t]`.
    pub fn add_noise_at(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let a = self.alpha_prod(t as i64, 1.0);
        lin2(original, a.sqrt(), noise, (1.0 - a).sqrt())
    }

    /// Integer timesteps used by PNDM and DDIM, in ascending order (diffusers'
    /// `set_timesteps` before reversal).
    pub fn ascending_int_timesteps(&self, steps: usize) -> Vec<i64> {
        let n = self.num_train_timesteps;
        let mut ts: Vec<i64> = match self.spacing {
            TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .map(|i| (i * ratio + self.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        ts.sort_unstable();
        ts
    }
}

/// `numpy.linspace(start, end, n)`.
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n).map(|i| start + step * i as f64).collect()
        }
    }
}

/// `a * x + b * y`.
pub(crate) fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sd15() -> SchedulerConfig {
        SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            num_train_timesteps: Some(1000),
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    #[test]
    fn timesteps_match_diffusers() -> Result<()> {
        let cfg = sd15();
        // PNDMScheduler(SD 1.5).set_timesteps(10).timesteps
        let p = build(SchedulerKind::Pndm, &cfg, 10, 0)?;
        let want = [
            901., 801., 801., 701., 601., 501., 401., 301., 201., 101., 1.,
        ];
        assert_eq!(p.timesteps(), &want);
        // DDIMScheduler(SD 1.5).set_timesteps(10).timesteps
        let d = build(SchedulerKind::Ddim, &cfg, 10, 0)?;
        let want = [901., 801., 701., 601., 501., 401., 301., 201., 101., 1.];
        assert_eq!(d.timesteps(), &want);
        // DPMSolverMultistepScheduler(SD 1.5, default linspace).set_timesteps(10).timesteps
        let m = build(SchedulerKind::DpmSolverMultistep, &cfg, 10, 0)?;
        let want = [999., 899., 799., 699., 599., 500., 400., 300., 200., 100.];
        assert_eq!(m.timesteps(), &want);
        // EulerAncestralDiscreteScheduler(SD 1.5, linspace): 999 ... 0, float.
        let e = build(SchedulerKind::EulerAncestral, &cfg, 10, 0)?;
        assert_eq!(e.timesteps().len(), 10);
        assert_eq!(e.timesteps()[0], 999.0);
        assert_eq!(e.timesteps()[1], 888.0);
        assert_eq!(e.timesteps()[9], 0.0);
        // init_noise_sigma = max sigma for linspace spacing (~14.6146 for SD 1.5).
        assert!((e.init_noise_sigma() - 14.6146).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn rejects_bad_step_counts() {
        let cfg = sd15();
        for kind in SchedulerKind::ALL {
            assert!(build(kind, &cfg, 0, 0).is_err());
            assert!(build(kind, &cfg, 1000, 0).is_err());
            assert!(build(kind, &cfg, 1, 0).is_ok());
        }
    }

    /// With an oracle model that predicts the exact noise for a known clean sample, every
    /// scheduler must land on that sample (up to the final alpha for PNDM/DDIM).
    #[test]
    fn oracle_model_recovers_the_clean_sample() -> Result<()> {
        use candle_core::Device;
        let cfg = sd15();
        let ac = Common::new(&cfg, TimestepSpacing::Leading).alphas_cumprod;
        let x0 = [0.3f64, -0.7];
        let eps0 = [1.1f64, -0.4];
        let vec = |v: [f64; 2]| Tensor::from_vec(v.to_vec(), (1, 1, 1, 2), &Device::Cpu);
        let vals = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
        for kind in SchedulerKind::ALL {
            for steps in [1, 2, 5, 20] {
                let mut s = build(kind, &cfg, steps, 9)?;
                let t0 = s.timesteps()[0];
                let mut x = if kind == SchedulerKind::EulerAncestral {
                    let sigma = s.init_noise_sigma();
                    vec([x0[0] + sigma * eps0[0], x0[1] + sigma * eps0[1]])?
                } else {
                    let a = ac[t0 as usize];
                    let f = |i: usize| a.sqrt() * x0[i] + (1.0 - a).sqrt() * eps0[i];
                    vec([f(0), f(1)])?
                };
                for i in 0..s.timesteps().len() {
                    let t = s.timesteps()[i];
                    let input = s.scale_model_input(x.clone(), i)?;
                    let (xv, iv) = (vals(&x)?, vals(&input)?);
                    let eps: Vec<f64> = (0..2)
                        .map(|j| {
                            if kind == SchedulerKind::EulerAncestral {
                                // input = x / sqrt(sigma^2 + 1)
                                let k = xv[j] / iv[j];
                                (xv[j] - x0[j]) / (k * k - 1.0).sqrt()
                            } else {
                                let a = ac[t as usize];
                                (xv[j] - a.sqrt() * x0[j]) / (1.0 - a).sqrt()
                            }
                        })
                        .collect();
                    x = s.step(&vec([eps[0], eps[1]])?, i, &x)?;
                }
                let got = vals(&x)?;
                let want: Vec<f64> = match kind {
                    SchedulerKind::Pndm | SchedulerKind::Ddim => (0..2)
                        .map(|j| ac[0].sqrt() * x0[j] + (1.0 - ac[0]).sqrt() * eps0[j])
                        .collect(),
                    _ => x0.to_vec(),
                };
                for j in 0..2 {
                    assert!(
                        (got[j] - want[j]).abs() < 1e-6,
                        "{kind} steps={steps}: got {got:?}, want {want:?}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Cross-check against candle-transformers' DDIM (SD 1.5 settings) with a model output
    /// that depends on both the sample and the timestep.
    #[test]
    fn ddim_matches_candle_reference() -> Result<()> {
        use candle_core::Device;
        use candle_transformers::models::stable_diffusion::ddim::DDIMSchedulerConfig;
        use candle_transformers::models::stable_diffusion::schedulers::SchedulerConfig as _;
        let mut ours = build(SchedulerKind::Ddim, &sd15(), 10, 0)?;
        let mut theirs = DDIMSchedulerConfig::default().build(10)?;
        let ts: Vec<usize> = theirs.timesteps().to_vec();
        assert_eq!(
            ours.timesteps(),
            ts.iter().map(|&t| t as f64).collect::<Vec<_>>().as_slice()
        );
        let x0 = Tensor::from_vec(vec![0.5f64, -1.2, 2.0, 0.1], (1, 1, 2, 2), &Device::Cpu)?;
        let (mut a, mut b) = (x0.clone(), x0);
        let fake =
            |x: &Tensor, t: f64| -> Result<Tensor> { Ok(((x * 0.7)?.tanh()? + t / 1000.0)?) };
        for (i, &t) in ts.iter().enumerate() {
            a = ours.step(&fake(&a, t as f64)?, i, &a)?;
            b = theirs.step(&fake(&b, t as f64)?, t, &b)?;
        }
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(diff < 1e-9, "max abs diff {diff}");
        Ok(())
    }
}
