//! The worker's model cache: each model folder is loaded once and shared by every slot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use farm_core::SchedulerName;
use farm_diffusion::{DType, Device, SchedulerKind, StableDiffusion};
use farm_storage::Storage;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model {name:?} not found: no folder {path} (a model's name is its folder name under FARM_MODELS)")]
    NotFound { name: String, path: String },
    #[error("model {name:?} failed to load: {message}")]
    Load { name: String, message: String },
}

impl ModelError {
    /// A model that is not there will not appear on a retry of this worker; but another
    /// worker may have it, so only a missing folder is final here.
    pub fn retryable(&self) -> bool {
        !matches!(self, ModelError::NotFound { .. })
    }
}

type Slot = Arc<OnceCell<Arc<StableDiffusion>>>;

pub struct ModelCache {
    root: PathBuf,
    device: Device,
    models: Mutex<HashMap<String, Slot>>,
    published: Option<(Storage, String)>,
}

impl ModelCache {
    pub fn new(root: PathBuf, device: Device) -> Self {
        ModelCache {
            root,
            device,
            models: Mutex::new(HashMap::new()),
            published: None,
        }
    }

    /// Also finds models that finetune jobs published to `storage` under `{prefix}/models/`,
    /// downloading them into the models root on first use.
    pub fn with_published(mut self, storage: Storage, prefix: &str) -> Self {
        self.published = Some((storage, prefix.to_string()));
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The local folder of model `name`, downloading a published model if needed.
    pub async fn local_dir(&self, name: &str) -> Result<PathBuf, ModelError> {
        let dir = self.root.join(name);
        if dir.join("model_index.json").is_file() || dir.join("unet").is_dir() {
            return Ok(dir);
        }
        let not_found = || ModelError::NotFound {
            name: name.to_string(),
            path: dir.display().to_string(),
        };
        let Some((storage, prefix)) = &self.published else {
            return Err(not_found());
        };
        let remote = format!("{prefix}/models/{name}");
        let load_err = |message: String| ModelError::Load {
            name: name.to_string(),
            message,
        };
        let keys = storage
            .list(&remote)
            .await
            .map_err(|e| load_err(e.to_string()))?;
        if !keys.iter().any(|k| k.ends_with("/model_index.json")) {
            return Err(not_found());
        }
        // Download beside the target, then rename: a half-downloaded model is never seen.
        let partial = self
            .root
            .join(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()));
        for key in &keys {
            let Some(relative) = key.strip_prefix(&format!("{remote}/")) else {
                continue;
            };
            let path = partial.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| load_err(e.to_string()))?;
            }
            let bytes = storage
                .get(key)
                .await
                .map_err(|e| load_err(e.to_string()))?;
            std::fs::write(&path, &bytes).map_err(|e| load_err(e.to_string()))?;
        }
        match std::fs::rename(&partial, &dir) {
            Ok(()) => {}
            // Another slot won the race; its copy is as good.
            Err(_) if dir.join("model_index.json").is_file() => {
                let _ = std::fs::remove_dir_all(&partial);
            }
            Err(e) => return Err(load_err(e.to_string())),
        }
        tracing::info!(
            model = name,
            files = keys.len(),
            "published model downloaded"
        );
        Ok(dir)
    }

    /// Names of the model folders under the models root (those with a `model_index.json`).
    pub fn available(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("model_index.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Names of the models loaded now.
    pub fn loaded(&self) -> Vec<String> {
        let Ok(models) = self.models.lock() else {
            return Vec::new();
        };
        let mut names: Vec<String> = models
            .iter()
            .filter(|(_, slot)| slot.initialized())
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// The loaded model `name` (with the VAE of model folder `vae`, when given), loading it on
    /// first use (once, however many slots ask).
    pub async fn get(
        &self,
        name: &str,
        vae: Option<&str>,
    ) -> Result<Arc<StableDiffusion>, ModelError> {
        let cache_key = match vae {
            Some(v) => format!("{name}+vae:{v}"),
            None => name.to_string(),
        };
        let slot: Slot = {
            let mut models = self.models.lock().map_err(|_| ModelError::Load {
                name: name.to_string(),
                message: "model cache lock poisoned".into(),
            })?;
            models.entry(cache_key).or_default().clone()
        };
        let vae_dir = vae.map(|v| self.root.join(v));
        let device = self.device.clone();
        slot.get_or_try_init(|| async move {
            let dir = self.local_dir(name).await?;
            if let Some(vae_dir) = &vae_dir {
                if !vae_dir.is_dir() {
                    return Err(ModelError::NotFound {
                        name: vae.unwrap_or_default().to_string(),
                        path: vae_dir.display().to_string(),
                    });
                }
            }
            let span = tracing::info_span!("load_model", model = name);
            let started = std::time::Instant::now();
            let dtype = if device.is_cuda() {
                DType::F16
            } else {
                DType::F32
            };
            let loaded = tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                StableDiffusion::load_with_vae(&dir, vae_dir.as_deref(), &device, dtype)
            })
            .await
            .map_err(|e| ModelError::Load {
                name: name.to_string(),
                message: e.to_string(),
            })?
            .map_err(|e| ModelError::Load {
                name: name.to_string(),
                message: e.to_string(),
            })?;
            tracing::info!(
                model = name,
                ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            Ok(Arc::new(loaded))
        })
        .await
        .cloned()
    }
}

pub(crate) fn mode(mode: farm_core::Mode) -> farm_diffusion::Mode {
    match mode {
        farm_core::Mode::Txt2Img => farm_diffusion::Mode::Txt2Img,
        farm_core::Mode::Img2Img => farm_diffusion::Mode::Img2Img,
        farm_core::Mode::Inpaint => farm_diffusion::Mode::Inpaint,
        farm_core::Mode::Reconstruct => farm_diffusion::Mode::Reconstruct,
        // Finetune tasks never reach the pipelines (see finetune.rs).
        farm_core::Mode::Finetune => farm_diffusion::Mode::Txt2Img,
    }
}

pub(crate) fn scheduler(name: SchedulerName) -> SchedulerKind {
    match name {
        SchedulerName::Pndm => SchedulerKind::Pndm,
        SchedulerName::Ddim => SchedulerKind::Ddim,
        SchedulerName::DpmPlusPlus => SchedulerKind::DpmSolverMultistep,
        SchedulerName::EulerAncestral => SchedulerKind::EulerAncestral,
    }
}
