//! AdamW with PyTorch's formula and defaults (`torch.optim.AdamW`, single-tensor path).
//!
//! For every parameter `p` with gradient `g`, at step `t` (starting at 1):
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)                    (decoupled weight decay)
//! m <- m + (g - m) * (1 - beta1)                      (= beta1 m + (1 - beta1) g)
//! v <- beta2 v + (1 - beta2) g^2
//! p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! candle_nn's `AdamW` computes the same quantity (`lr * m_hat / (sqrt(v_hat) + eps)`), but
//! its moments are private, so they cannot be checkpointed; this one exposes its state.
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{DiffusionError, Result};

/// AdamW hyper-parameters; `Default` is PyTorch's defaults with the issue's `lr = 1e-4`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DiffusionError::InvalidInput(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps must be >= 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// The optimizer: first and second moments per parameter name, and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (PyTorch's `state["step"]`, the same for every parameter).
    pub step: u64,
    /// `(m, v)` per parameter, created (zeros) on its first gradient.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            moments: BTreeMap::new(),
        })
    }

    /// One update of every variable that has a gradient in `grads`. Variables without a
    /// gradient are left untouched (PyTorch skips parameters whose `grad` is `None`).
    pub fn step(&mut self, vars: &BTreeMap<String, Var>, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bias1;
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let p = var.as_detached_tensor();
            let (m, v) = match self.moments.get(name) {
                Some((m, v)) => (m.clone(), v.clone()),
                None => (p.zeros_like()?, p.zeros_like()?),
            };
            let p = (p * (1.0 - c.lr * c.weight_decay))?;
            let m = (&m + ((&g - &m)? * (1.0 - c.beta1))?)?;
            let v = ((&v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let p = (p - (m.div(&denom)? * step_size)?)?;
            var.set(&p)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }
}
