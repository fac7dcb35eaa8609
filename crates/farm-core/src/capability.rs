//! What a worker can render, and which tasks can share one UNet call.

use serde::{Deserialize, Serialize};

use crate::spec::{JobSpec, SchedulerName, TaskSpec};
use crate::Mode;

/// What a worker says it can take. The coordinator routes a task only to workers that admit
/// it, and refuses a submit that no online worker admits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The largest `width × height` it renders; `None`: any size.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Accelerator memory in bytes; a model larger than this is never routed to it.
    #[serde(default)]
    pub device_memory: Option<u64>,
    /// The modes it runs; empty: all of them.
    #[serde(default)]
    pub modes: Vec<Mode>,
}

/// Why a worker cannot take a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("it does not run mode {}", .0.as_str())]
    Mode(Mode),
    #[error("{width}x{height} is {pixels} pixels, more than its max of {max}")]
    Pixels {
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    #[error("the model takes {need} bytes, more than its {have} bytes of device memory")]
    Memory { need: u64, have: u64 },
}

impl Capabilities {
    /// Whether a task of `mode` at `width × height`, with a model of `model_bytes` (when
    /// known), fits this worker.
    pub fn admits(
        &self,
        mode: Mode,
        width: u32,
        height: u32,
        model_bytes: Option<u64>,
    ) -> Result<(), Unfit> {
        if !self.modes.is_empty() && !self.modes.contains(&mode) {
            return Err(Unfit::Mode(mode));
        }
        let pixels = u64::from(width) * u64::from(height);
        if let Some(max) = self.max_pixels {
            if pixels > max {
                return Err(Unfit::Pixels {
                    width,
                    height,
                    pixels,
                    max,
                });
            }
        }
        if let (Some(have), Some(need)) = (self.device_memory, model_bytes) {
            if need > have {
                return Err(Unfit::Memory { need, have });
            }
        }
        Ok(())
    }
}

/// Tasks with equal keys can be rendered in one batch (one UNet call per step): same model
/// and VAE, size, schedule, guidance, mode and strength, and the same input images. Prompts
/// and seeds may differ; each image still depends only on its own seed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    model: String,
    vae: Option<String>,
    mode: Mode,
    width: u32,
    height: u32,
    steps: u32,
    scheduler: SchedulerName,
    guidance_bits: u64,
    strength_bits: u64,
    init_image: Option<String>,
    mask: Option<String>,
}

impl BatchKey {
    /// The model folder's name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The model (with its VAE) a worker must hold: the unit of model affinity.
    pub fn model_key(&self) -> String {
        model_key(&self.model, self.vae.as_deref())
    }
}

/// `model` or `model+vae:VAE`: how workers name a loaded model.
pub fn model_key(model: &str, vae: Option<&str>) -> String {
    match vae {
        Some(v) => format!("{model}+vae:{v}"),
        None => model.to_string(),
    }
}

impl JobSpec {
    /// The batch key of every task of this job; `None` for fine-tuning, which runs alone.
    pub fn batch_key(&self) -> Option<BatchKey> {
        (self.mode != Mode::Finetune).then(|| BatchKey {
            model: self.model.clone(),
            vae: self.vae.clone(),
            mode: self.mode,
            width: self.width,
            height: self.height,
            steps: self.steps,
            scheduler: self.scheduler,
            guidance_bits: self.guidance_scale.to_bits(),
            strength_bits: self.strength.to_bits(),
            init_image: self.init_image.clone(),
            mask: self.mask.clone(),
        })
    }
}

impl TaskSpec {
    /// See [`BatchKey`]; `None` for fine-tuning.
    pub fn batch_key(&self) -> Option<BatchKey> {
        (self.mode != Mode::Finetune && self.train.is_none()).then(|| BatchKey {
            model: self.model.clone(),
            vae: self.vae.clone(),
            mode: self.mode,
            width: self.width,
            height: self.height,
            steps: self.steps,
            scheduler: self.scheduler,
            guidance_bits: self.guidance_scale.to_bits(),
            strength_bits: self.strength.to_bits(),
            init_image: self.init_image.clone(),
            mask: self.mask.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_capability_set_admits_everything() {
        let any = Capabilities::default();
        assert_eq!(
            any.admits(Mode::Inpaint, 4096, 4096, Some(u64::MAX)),
            Ok(())
        );
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let caps = Capabilities {
            max_pixels: Some(512 * 512),
            device_memory: Some(1000),
            modes: vec![Mode::Txt2Img],
        };
        assert_eq!(caps.admits(Mode::Txt2Img, 512, 512, Some(1000)), Ok(()));
        assert_eq!(
            caps.admits(Mode::Img2Img, 64, 64, None),
            Err(Unfit::Mode(Mode::Img2Img))
        );
        assert!(matches!(
            caps.admits(Mode::Txt2Img, 768, 512, None),
            Err(Unfit::Pixels { max: 262_144, .. })
        ));
        assert_eq!(
            caps.admits(Mode::Txt2Img, 64, 64, Some(1001)),
            Err(Unfit::Memory {
                need: 1001,
                have: 1000
            })
        );
        // An unknown model size is not held against it.
        assert_eq!(caps.admits(Mode::Txt2Img, 64, 64, None), Ok(()));
    }
}
