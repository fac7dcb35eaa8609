//! Downloading a diffusers-layout model from the Hugging Face Hub (feature `hub`).
//!
//! Only what [`crate::StableDiffusion::load`] reads is fetched: `model_index.json`, the
//! configs, the tokenizer files and the `*.safetensors` weights of `unet`, `vae` and
//! `text_encoder` (full precision when the repository has them, else the `fp16` variant,
//! saved under the plain name). Pickle weights (`.bin`, `.ckpt`) are never downloaded.
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::{DiffusionError, Result};

/// Files outside the weights that a model folder needs (when the repository has them).
const CONFIGS: [&str; 10] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/added_tokens.json",
];

/// `(subfolder, weights file name in the model folder)`.
const WEIGHTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
];

/// What to download: `(file in the repository, path in the model folder)`.
pub fn plan(files: &[String]) -> Result<Vec<(String, String)>> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let mut out: Vec<(String, String)> = CONFIGS
        .iter()
        .filter(|f| has(f))
        .map(|f| (f.to_string(), f.to_string()))
        .collect();
    for required in ["model_index.json", "unet/config.json", "vae/config.json"] {
        if !has(required) {
            return Err(DiffusionError::InvalidInput(format!(
                "the repository has no {required}: not a diffusers-layout Stable Diffusion model"
            )));
        }
    }
    for (sub, name) in WEIGHTS {
        let full = format!("{sub}/{name}");
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name, "safetensors"));
        let half = format!("{sub}/{stem}.fp16.{ext}");
        let source = if has(&full) {
            full.clone()
        } else if has(&half) {
            half
        } else {
            return Err(DiffusionError::InvalidInput(format!(
                "the repository has no {full} (safetensors weights are required; .bin/.ckpt \
                 files are not downloaded)"
            )));
        };
        out.push((source, full));
    }
    Ok(out)
}

/// Downloads `repo` (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) at `revision`
/// (default `main`) into `models/<last part of repo>` and returns that folder. Files go
/// through the Hub cache `models/.hf-cache`. `HF_TOKEN` / `HF_ENDPOINT` are honoured.
pub fn pull(repo: &str, revision: Option<&str>, models: &Path) -> Result<PathBuf> {
    let name = repo
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| DiffusionError::InvalidInput(format!("bad repository name {repo:?}")))?;
    let revision = revision.unwrap_or("main").to_owned();
    let offline = |e: &dyn std::fmt::Display| {
        DiffusionError::InvalidInput(format!(
            "cannot download {repo} (revision {revision}) from the Hugging Face Hub: {e}. \
             Is this machine offline? Copy a diffusers-layout folder into {} instead.",
            models.display()
        ))
    };
    let api = ApiBuilder::from_env()
        .with_cache_dir(models.join(".hf-cache"))
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| offline(&e))?;
    let hub = api.repo(Repo::with_revision(
        repo.to_owned(),
        RepoType::Model,
        revision.clone(),
    ));
    let info = hub.info().map_err(|e| offline(&e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let plan = plan(&files)?;
    let dest = models.join(name);
    for (source, target) in plan {
        let cached = hub.get(&source).map_err(|e| offline(&e))?;
        let target = dest.join(target);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&cached, &target).map_err(|e| {
            DiffusionError::InvalidInput(format!(
                "cannot copy {} to {}: {e}",
                cached.display(),
                target.display()
            ))
        })?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_safetensors_only() -> Result<()> {
        let files: Vec<String> = [
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "v1-5-pruned.ckpt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let plan = plan(&files)?;
        assert!(plan
            .iter()
            .all(|(s, _)| !s.ends_with(".bin") && !s.ends_with(".ckpt")));
        assert!(plan.contains(&(
            "unet/diffusion_pytorch_model.fp16.safetensors".into(),
            "unet/diffusion_pytorch_model.safetensors".into()
        )));
        assert!(plan.contains(&(
            "vae/diffusion_pytorch_model.safetensors".into(),
            "vae/diffusion_pytorch_model.safetensors".into()
        )));
        let missing: Vec<String> = files
            .iter()
            .filter(|f| !f.starts_with("text_encoder/model"))
            .cloned()
            .collect();
        assert!(plan_err(&missing).contains("text_encoder/model.safetensors"));
        Ok(())
    }

    fn plan_err(files: &[String]) -> String {
        match plan(files) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("expected an error, got {p:?}"),
        }
    }
}
