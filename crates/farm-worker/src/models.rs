//! The worker's model cache: each model folder is loaded once and shared by every slot. With
//! a capacity (`--model-cache-bytes`) the least recently used models are evicted to make room;
//! loads and evictions are counted and reported in heartbeats, so the coordinator can route
//! tasks to workers that already hold their model.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use farm_core::SchedulerName;
use farm_diffusion::{DType, Device, SchedulerKind, StableDiffusion};
use farm_queue::CacheState;
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

#[derive(Default)]
struct Entry {
    slot: Slot,
    /// Weight bytes once loaded.
    bytes: u64,
    /// When it was last asked for (a counter, for LRU).
    used_at: u64,
}

#[derive(Default)]
struct Inner {
    models: HashMap<String, Entry>,
    clock: u64,
    loads: u64,
    evictions: u64,
}

pub struct ModelCache {
    root: PathBuf,
    device: Device,
    capacity: Option<u64>,
    inner: Mutex<Inner>,
    published: Option<(Storage, String)>,
}

impl ModelCache {
    pub fn new(root: PathBuf, device: Device) -> Self {
        ModelCache {
            root,
            device,
            capacity: None,
            inner: Mutex::new(Inner::default()),
            published: None,
        }
    }

    /// Keeps at most `bytes` of models loaded (a model larger than that is still loaded,
    /// alone), evicting the least recently used.
    pub fn with_capacity(mut self, bytes: Option<u64>) -> Self {
        self.capacity = bytes;
        self
    }

    /// What the cache holds, for heartbeats.
    pub fn state(&self) -> CacheState {
        let Ok(inner) = self.inner.lock() else {
            return CacheState::default();
        };
        let mut models: Vec<(String, u64)> = inner
            .models
            .iter()
            .filter(|(_, e)| e.slot.initialized())
            .map(|(k, e)| (k.clone(), e.bytes))
            .collect();
        models.sort();
        CacheState {
            capacity: self.capacity,
            used: models.iter().map(|(_, b)| b).sum(),
            models,
            loads: inner.loads,
            evictions: inner.evictions,
        }
    }

    /// Records a finished load of `key`, then evicts least recently used models until the
    /// cache fits its capacity again (never `key` itself).
    fn loaded_now(&self, key: &str, bytes: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.loads += 1;
        if let Some(e) = inner.models.get_mut(key) {
            e.bytes = bytes;
        }
        let Some(capacity) = self.capacity else {
            return;
        };
        loop {
            let used: u64 = inner
                .models
                .iter()
                .filter(|(k, e)| e.slot.initialized() || k.as_str() == key)
                .map(|(_, e)| e.bytes)
                .sum();
            if used <= capacity {
                return;
            }
            let victim = inner
                .models
                .iter()
                .filter(|(k, e)| k.as_str() != key && e.slot.initialized())
                .min_by_key(|(_, e)| e.used_at)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return;
            };
            inner.models.remove(&victim);
            inner.evictions += 1;
            tracing::info!(model = %victim, for_model = key, "model evicted from the cache");
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
        let remote = farm_core::published_model_dir(prefix, name);
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

    /// The loaded model `name` (with the VAE of model folder `vae`, when given), loading it on
    /// first use (once, however many slots ask).
    pub async fn get(
        &self,
        name: &str,
        vae: Option<&str>,
    ) -> Result<Arc<StableDiffusion>, ModelError> {
        let cache_key = farm_core::model_key(name, vae);
        let slot: Slot = {
            let mut inner = self.inner.lock().map_err(|_| ModelError::Load {
                name: name.to_string(),
                message: "model cache lock poisoned".into(),
            })?;
            inner.clock += 1;
            let now = inner.clock;
            let entry = inner.models.entry(cache_key.clone()).or_default();
            entry.used_at = now;
            entry.slot.clone()
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
                bytes = loaded.weight_bytes(),
                "model loaded"
            );
            self.loaded_now(&cache_key, loaded.weight_bytes());
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
