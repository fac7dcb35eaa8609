//! A tiny random-weight model with the real SD 1.x architecture, for tests and demos.
//!
//! [`init_tiny`] writes a complete diffusers-layout folder (configs, tokenizer, weights)
//! that [`crate::StableDiffusion::load`] reads like a real model. The tokenizer is CLIP's
//! real vocabulary, derived from the embedded `bpe_simple_vocab_16e6.txt.gz` the same way
//! CLIP builds it, so token ids match the real SD tokenizer.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Value};

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, JsonFile, UNetConfig, VaeConfig};
use crate::tokenizer::{bytes_to_unicode, Tokenizer, BOS, EOS};
use crate::{DiffusionError, Result};

/// OpenAI CLIP's BPE merges file (gzip), as shipped with CLIP.
static CLIP_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// Merges CLIP uses: 49152 - 256 - 2.
const CLIP_MERGES: usize = 48894;
const DIFFUSERS_VERSION: &str = "0.21.0";

/// CLIP's merges, in rank order (the file's lines `1..=48894`).
pub fn clip_merges() -> Result<Vec<(String, String)>> {
    let bad = |m: String| DiffusionError::model("assets/bpe_simple_vocab_16e6.txt.gz", m);
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    let merges: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .take(CLIP_MERGES)
        .map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| bad(format!("bad merge line {l:?}")))
        })
        .collect::<Result<_>>()?;
    if merges.len() != CLIP_MERGES {
        return Err(bad(format!("only {} merges", merges.len())));
    }
    Ok(merges)
}

/// CLIP's vocabulary in id order: 256 byte characters, the same with `</w>`, every merge
/// joined, then `<|startoftext|>` and `<|endoftext|>` (49408 entries).
pub fn clip_vocab(merges: &[(String, String)]) -> Vec<String> {
    let bytes: Vec<String> = bytes_to_unicode()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut vocab = bytes.clone();
    vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS.to_owned());
    vocab.push(EOS.to_owned());
    vocab
}

/// The real CLIP tokenizer built from the embedded merges (pad = `<|endoftext|>`).
pub fn clip_tokenizer() -> Result<Tokenizer> {
    let merges = clip_merges()?;
    let encoder = vocab_map(&clip_vocab(&merges));
    Tokenizer::new(encoder, merges, None)
        .map_err(|m| DiffusionError::model("assets/bpe_simple_vocab_16e6.txt.gz", m))
}

fn vocab_map(vocab: &[String]) -> HashMap<String, u32> {
    vocab
        .iter()
        .zip(0u32..)
        .map(|(t, i)| (t.clone(), i))
        .collect()
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| DiffusionError::InvalidInput(format!("cannot serialise JSON: {e}")))?;
    std::fs::write(path, text + "\n")?;
    Ok(())
}

/// Overwrites every variable with seeded random values: norm weights around 1, biases
/// small, matrices/kernels normal with std `1/sqrt(fan_in)`, embeddings std 0.02.
pub(crate) fn randomize(varmap: &VarMap, seed: u64, stream: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        let (mean, std) = match dims.as_slice() {
            [_] if name.ends_with(".weight") => (1.0f32, 0.1f32),
            [_] => (0.0, 0.05),
            _ if name.contains("embedding") => (0.0, 0.02),
            [_, rest @ ..] => (
                0.0,
                1.0 / (rest.iter().product::<usize>().max(1) as f32).sqrt(),
            ),
            [] => (0.0, 0.0),
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
            .collect();
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(())
}

/// Writes a tiny random-weight Stable Diffusion 1.x model (diffusers layout) into `dir`.
///
/// The architecture is SD 1.x's, scaled down like diffusers' test models: UNet with
/// blocks `[32, 64]` (`CrossAttnDownBlock2D`, `DownBlock2D`), VAE with blocks `[32, 64]`
/// (so the VAE scale factor is 2, not 8), a 5-layer CLIP text encoder of width 32 with
/// the real CLIP vocabulary, and SD 1.5's PNDM scheduler config. Weights are
/// deterministic in `seed`.
pub fn init_tiny(dir: &Path, seed: u64) -> Result<()> {
    init_random(dir, ModelSize::Tiny, seed)
}

/// The architectures [`init_random`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSize {
    /// Scaled down for tests (see [`init_tiny`]).
    Tiny,
    /// Stable Diffusion 1.5's full size: the configs of its diffusers release (UNet of
    /// 860 M parameters, CLIP ViT-L/14 text encoder, VAE with blocks 128 to 512), random
    /// weights in f32 (about 4.3 GB). For measuring memory and speed, not for images.
    Sd15,
}

/// `base` with the entries of `changes`, if any, put in (both JSON objects).
fn with(mut base: Value, changes: Option<Value>) -> Value {
    if let (Some(b), Some(Value::Object(c))) = (base.as_object_mut(), changes) {
        b.extend(c);
    }
    base
}

/// Writes a random-weight Stable Diffusion 1.x model of `size` (diffusers layout) into
/// `dir`. Weights are deterministic in `seed`.
pub fn init_random(dir: &Path, size: ModelSize, seed: u64) -> Result<()> {
    let full = size == ModelSize::Sd15;
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "PNDMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null
        }),
    )?;

    // Tokenizer: CLIP's real vocabulary.
    let merges = clip_merges()?;
    let vocab = clip_vocab(&merges);
    let vocab_json: serde_json::Map<String, Value> = vocab
        .iter()
        .zip(0u32..)
        .map(|(t, i)| (t.clone(), Value::from(i)))
        .collect();
    std::fs::write(
        dir.join("tokenizer/vocab.json"),
        serde_json::to_string(&vocab_json)
            .map_err(|e| DiffusionError::InvalidInput(format!("cannot serialise JSON: {e}")))?,
    )?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(a);
        merges_txt.push(' ');
        merges_txt.push_str(b);
        merges_txt.push('\n');
    }
    std::fs::write(dir.join("tokenizer/merges.txt"), merges_txt)?;
    write_json(
        &dir.join("tokenizer/special_tokens_map.json"),
        &json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS }),
    )?;
    write_json(
        &dir.join("tokenizer/tokenizer_config.json"),
        &json!({
            "add_prefix_space": false,
            "bos_token": BOS,
            "do_lower_case": true,
            "eos_token": EOS,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": EOS,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": EOS
        }),
    )?;

    // Text encoder.
    let path = dir.join("text_encoder/config.json");
    let config = json!({
        "_name_or_path": "farm-diffusion/tiny",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "pad_token_id": 1,
        "projection_dim": 32,
        "torch_dtype": "float32",
        "vocab_size": 49408
    });
    let config = with(
        config,
        full.then(|| {
            json!({
                "_name_or_path": "farm-diffusion/sd15-random",
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_attention_heads": 12,
                "num_hidden_layers": 12,
                "projection_dim": 768
            })
        }),
    );
    write_json(&path, &config)?;
    let cfg = ClipTextConfig::from_json(&JsonFile::read(&path)?)?;
    let varmap = VarMap::new();
    ClipTextModel::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )?;
    randomize(&varmap, seed, 3)?;
    varmap.save(dir.join("text_encoder/model.safetensors"))?;

    // UNet.
    let path = dir.join("unet/config.json");
    let config = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": false
    });
    let config = with(
        config,
        full.then(|| {
            json!({
                "block_out_channels": [320, 640, 1280, 1280],
                "cross_attention_dim": 768,
                "down_block_types": [
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D"
                ],
                "sample_size": 64,
                "up_block_types": [
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"
                ]
            })
        }),
    );
    write_json(&path, &config)?;
    let cfg = UNetConfig::from_json(&JsonFile::read(&path)?)?;
    let varmap = VarMap::new();
    UNet2DConditionModel::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        cfg.in_channels,
        cfg.out_channels,
        false,
        cfg.candle,
    )?;
    randomize(&varmap, seed, 1)?;
    varmap.save(dir.join("unet/diffusion_pytorch_model.safetensors"))?;

    // VAE.
    let path = dir.join("vae/config.json");
    let config = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": [
            "DownEncoderBlock2D",
            "DownEncoderBlock2D",
            "DownEncoderBlock2D",
            "DownEncoderBlock2D"
        ],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "up_block_types": [
            "UpDecoderBlock2D",
            "UpDecoderBlock2D",
            "UpDecoderBlock2D",
            "UpDecoderBlock2D"
        ]
    });
    let config = with(
        config,
        full.then(|| {
            json!({
                "block_out_channels": [128, 256, 512, 512],
                "layers_per_block": 2,
                "sample_size": 512
            })
        }),
    );
    write_json(&path, &config)?;
    let cfg = VaeConfig::from_json(&JsonFile::read(&path)?)?;
    let varmap = VarMap::new();
    AutoEncoderKL::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        cfg.in_channels,
        cfg.out_channels,
        cfg.candle,
    )?;
    randomize(&varmap, seed, 2)?;
    varmap.save(dir.join("vae/diffusion_pytorch_model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_has_clip_layout() -> Result<()> {
        let merges = clip_merges()?;
        let vocab = clip_vocab(&merges);
        assert_eq!(vocab.len(), 49408);
        assert_eq!(vocab[320], "a</w>");
        assert_eq!(vocab[49406], BOS);
        assert_eq!(vocab[49407], EOS);
        Ok(())
    }
}
