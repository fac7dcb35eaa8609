//! Reading the JSON configs of a diffusers model folder.
//!
//! Every problem is reported as [`DiffusionError::Model`] naming the file and the key.
//! Keys that diffusers/transformers give a default take that default when missing.
use std::path::{Path, PathBuf};

use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde_json::{Map, Value};

use crate::{DiffusionError, Result};

/// A parsed JSON object together with the file it came from, for error messages.
#[derive(Debug, Clone)]
pub struct JsonFile {
    path: PathBuf,
    map: Map<String, Value>,
}

impl JsonFile {
    /// Reads and parses `path`, which must hold a JSON object.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DiffusionError::model(path, format!("cannot read file: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| DiffusionError::model(path, format!("invalid JSON: {e}")))?;
        Self::from_value(path, value)
    }

    /// Wraps an already parsed value; `path` is only used in error messages.
    pub fn from_value(path: &Path, value: Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(DiffusionError::model(path, "expected a JSON object")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, key: &str, what: &str) -> DiffusionError {
        DiffusionError::model(&self.path, format!("key `{key}`: {what}"))
    }

    /// The value of `key`, treating JSON `null` as missing.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The raw value of `key` (`None` when missing or `null`).
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, &format!("expected a non-negative integer, got {v}")))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        self.as_usize(key, v)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            Some(v) => self.as_usize(key, v),
            None => Ok(default),
        }
    }

    /// A positive integer (zero is rejected).
    pub fn positive(&self, key: &str) -> Result<usize> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(self.err(key, "must be positive"));
        }
        Ok(n)
    }

    pub fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        let n = self.usize_or(key, default)?;
        if n == 0 {
            return Err(self.err(key, "must be positive"));
        }
        Ok(n)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(key, &format!("expected a number, got {v}"))),
            None => Ok(default),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, &format!("expected true/false, got {v}"))),
            None => Ok(default),
        }
    }

    pub fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| self.err(key, &format!("expected a string, got {v}"))),
            None => Ok(default.to_owned()),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, "expected a list of strings"))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.err(key, "expected a list of strings"))
            })
            .collect()
    }

    pub fn positives(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.require(key)?;
        self.positives_value(key, v)
    }

    fn positives_value(&self, key: &str, v: &Value) -> Result<Vec<usize>> {
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(key, "expected a list of positive integers"))?;
        if arr.is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        arr.iter()
            .map(|x| match self.as_usize(key, x)? {
                0 => Err(self.err(key, "entries must be positive")),
                n => Ok(n),
            })
            .collect()
    }

    /// An integer or a list of `n` integers (diffusers accepts both for per-block values).
    pub fn per_block(&self, key: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>> {
        match self.get(key) {
            None => match default {
                Some(d) => Ok(vec![d; n]),
                None => Err(self.err(key, "missing")),
            },
            Some(v) if v.is_array() => {
                let list = self.positives_value(key, v)?;
                if list.len() != n {
                    return Err(self.err(
                        key,
                        &format!("expected {n} entries (one per block), got {}", list.len()),
                    ));
                }
                Ok(list)
            }
            Some(v) => match self.as_usize(key, v)? {
                0 => Err(self.err(key, "must be positive")),
                x => Ok(vec![x; n]),
            },
        }
    }
}

/// The UNet's config mapped to candle's config plus the channel counts.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub candle: UNet2DConditionModelConfig,
}

impl UNetConfig {
    /// Maps a diffusers `unet/config.json` (UNet2DConditionModel) to candle's config.
    pub fn from_json(j: &JsonFile) -> Result<Self> {
        let down_types = j.strings("down_block_types")?;
        let n = down_types.len();
        if n == 0 {
            return Err(j.err("down_block_types", "must not be empty"));
        }
        let channels = j.positives("block_out_channels")?;
        if channels.len() != n {
            return Err(j.err(
                "block_out_channels",
                &format!(
                    "has {} entries but down_block_types has {n}",
                    channels.len()
                ),
            ));
        }
        if let Some(Value::Array(_)) = j.get("up_block_types") {
            let up = j.strings("up_block_types")?;
            let expected: Vec<String> = down_types
                .iter()
                .rev()
                .map(|t| t.replace("Down", "Up"))
                .collect();
            if up != expected {
                return Err(j.err(
                    "up_block_types",
                    &format!("expected the mirror of down_block_types {expected:?}"),
                ));
            }
        }
        let mid = j.string_or("mid_block_type", "UNetMidBlock2DCrossAttn")?;
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(j.err("mid_block_type", &format!("unsupported {mid:?}")));
        }
        if let Some(v) = j.get("layers_per_block") {
            if v.is_array() {
                return Err(j.err("layers_per_block", "per-block lists are not supported"));
            }
        }
        let layers_per_block = j.positive_or("layers_per_block", 2)?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim; in SD 1.x
        // configs `attention_head_dim` really is the number of heads.
        let heads = if j.get("num_attention_heads").is_some() {
            j.per_block("num_attention_heads", n, None)?
        } else {
            j.per_block("attention_head_dim", n, Some(8))?
        };
        let transformer_layers = j.per_block("transformer_layers_per_block", n, Some(1))?;
        let norm_num_groups = j.positive_or("norm_num_groups", 32)?;
        let cross_attention_dim = j.positive("cross_attention_dim")?;
        let mut blocks = Vec::with_capacity(n);
        for (i, ty) in down_types.iter().enumerate() {
            let use_cross_attn = match ty.as_str() {
                "CrossAttnDownBlock2D" => Some(transformer_layers[i]),
                "DownBlock2D" => None,
                other => {
                    return Err(j.err("down_block_types", &format!("unsupported block {other:?}")))
                }
            };
            let c = channels[i];
            if c % norm_num_groups != 0 {
                return Err(j.err(
                    "block_out_channels",
                    &format!("{c} is not divisible by norm_num_groups {norm_num_groups}"),
                ));
            }
            if c % heads[i] != 0 {
                return Err(j.err(
                    "attention_head_dim",
                    &format!("{c} channels are not divisible by {} heads", heads[i]),
                ));
            }
            blocks.push(BlockConfig {
                out_channels: c,
                use_cross_attn,
                attention_head_dim: heads[i],
            });
        }
        let candle = UNet2DConditionModelConfig {
            center_input_sample: j.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: j.bool_or("flip_sin_to_cos", true)?,
            freq_shift: j.f64_or("freq_shift", 0.0)?,
            blocks,
            layers_per_block,
            downsample_padding: j.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: j.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: j.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: j.bool_or("use_linear_projection", false)?,
        };
        Ok(Self {
            in_channels: j.positive_or("in_channels", 4)?,
            out_channels: j.positive_or("out_channels", 4)?,
            candle,
        })
    }
}

/// The VAE's config mapped to candle's config.
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
    pub candle: AutoEncoderKLConfig,
}

impl VaeConfig {
    /// Maps a diffusers `vae/config.json` (AutoencoderKL).
    pub fn from_json(j: &JsonFile) -> Result<Self> {
        let block_out_channels = j.positives("block_out_channels")?;
        let norm_num_groups = j.positive_or("norm_num_groups", 32)?;
        for key in ["down_block_types", "up_block_types"] {
            if j.get(key).is_some() {
                let want = if key == "down_block_types" {
                    "DownEncoderBlock2D"
                } else {
                    "UpDecoderBlock2D"
                };
                let types = j.strings(key)?;
                if types.len() != block_out_channels.len() || types.iter().any(|t| t != want) {
                    return Err(j.err(
                        key,
                        &format!(
                            "expected {} x {want:?} (one per block_out_channels entry)",
                            block_out_channels.len()
                        ),
                    ));
                }
            }
        }
        if let Some(c) = block_out_channels
            .iter()
            .find(|c| *c % norm_num_groups != 0)
        {
            return Err(j.err(
                "block_out_channels",
                &format!("{c} is not divisible by norm_num_groups {norm_num_groups}"),
            ));
        }
        let scaling_factor = j.f64_or("scaling_factor", 0.18215)?;
        if scaling_factor == 0.0 {
            return Err(j.err("scaling_factor", "must not be zero"));
        }
        Ok(Self {
            in_channels: j.positive_or("in_channels", 3)?,
            out_channels: j.positive_or("out_channels", 3)?,
            scaling_factor,
            candle: AutoEncoderKLConfig {
                block_out_channels,
                layers_per_block: j.positive_or("layers_per_block", 1)?,
                latent_channels: j.positive_or("latent_channels", 4)?,
                norm_num_groups,
                use_quant_conv: j.bool_or("use_quant_conv", true)?,
                use_post_quant_conv: j.bool_or("use_post_quant_conv", true)?,
            },
        })
    }

    /// How much smaller the latents are than the image: `2^(blocks - 1)` (8 for SD 1.x).
    pub fn scale_factor(&self) -> usize {
        1usize << (self.candle.block_out_channels.len().saturating_sub(1)).min(16)
    }
}

/// The activation used in the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// transformers' `CLIPTextConfig` (the keys this crate uses).
#[derive(Debug, Clone)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    pub fn from_json(j: &JsonFile) -> Result<Self> {
        let hidden_size = j.positive("hidden_size")?;
        let num_attention_heads = j.positive("num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(j.err(
                "num_attention_heads",
                &format!("hidden_size {hidden_size} is not divisible by {num_attention_heads}"),
            ));
        }
        let act = j.string_or("hidden_act", "quick_gelu")?;
        let hidden_act = match act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(j.err("hidden_act", &format!("unsupported {other:?}"))),
        };
        let max_position_embeddings = j.positive_or("max_position_embeddings", 77)?;
        if max_position_embeddings < crate::tokenizer::MAX_LEN {
            return Err(j.err(
                "max_position_embeddings",
                &format!("must be at least {}", crate::tokenizer::MAX_LEN),
            ));
        }
        Ok(Self {
            vocab_size: j.positive_or("vocab_size", 49408)?,
            hidden_size,
            intermediate_size: j.positive("intermediate_size")?,
            num_hidden_layers: j.positive("num_hidden_layers")?,
            num_attention_heads,
            max_position_embeddings,
            hidden_act,
            layer_norm_eps: j.f64_or("layer_norm_eps", 1e-5)?,
        })
    }
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// `scheduler/scheduler_config.json`. `None` means the key is absent, in which case each
/// scheduler applies its own diffusers default.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub num_train_timesteps: Option<usize>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub prediction_type: Option<PredictionType>,
}

/// The beta schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

impl SchedulerConfig {
    pub fn from_json(j: &JsonFile) -> Result<Self> {
        fn opt<T>(
            j: &JsonFile,
            key: &str,
            f: impl FnOnce(&JsonFile, &str) -> Result<T>,
        ) -> Result<Option<T>> {
            if j.get(key).is_some() {
                f(j, key).map(Some)
            } else {
                Ok(None)
            }
        }
        let beta_schedule = opt(j, "beta_schedule", |j, k| {
            match j.string_or(k, "")?.as_str() {
                "linear" => Ok(BetaSchedule::Linear),
                "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
                other => Err(j.err(k, &format!("unsupported {other:?}"))),
            }
        })?;
        let timestep_spacing = opt(j, "timestep_spacing", |j, k| {
            match j.string_or(k, "")?.as_str() {
                "leading" => Ok(TimestepSpacing::Leading),
                "trailing" => Ok(TimestepSpacing::Trailing),
                "linspace" => Ok(TimestepSpacing::Linspace),
                other => Err(j.err(k, &format!("unsupported {other:?}"))),
            }
        })?;
        let prediction_type = opt(j, "prediction_type", |j, k| {
            match j.string_or(k, "")?.as_str() {
                "epsilon" => Ok(PredictionType::Epsilon),
                "v_prediction" => Ok(PredictionType::VPrediction),
                other => Err(j.err(k, &format!("unsupported {other:?}"))),
            }
        })?;
        let cfg = Self {
            beta_start: opt(j, "beta_start", |j, k| j.f64_or(k, 0.0))?,
            beta_end: opt(j, "beta_end", |j, k| j.f64_or(k, 0.0))?,
            beta_schedule,
            num_train_timesteps: opt(j, "num_train_timesteps", |j, k| j.positive(k))?,
            steps_offset: opt(j, "steps_offset", |j, k| j.usize(k))?,
            set_alpha_to_one: opt(j, "set_alpha_to_one", |j, k| j.bool_or(k, false))?,
            clip_sample: opt(j, "clip_sample", |j, k| j.bool_or(k, false))?,
            clip_sample_range: opt(j, "clip_sample_range", |j, k| j.f64_or(k, 1.0))?,
            timestep_spacing,
            prediction_type,
        };
        if j.get("trained_betas").is_some() {
            return Err(j.err("trained_betas", "explicit betas are not supported"));
        }
        for key in [
            "rescale_betas_zero_snr",
            "thresholding",
            "use_karras_sigmas",
        ] {
            if j.bool_or(key, false)? {
                return Err(j.err(key, "only `false` is supported"));
            }
        }
        for (key, v) in [("beta_start", cfg.beta_start), ("beta_end", cfg.beta_end)] {
            if let Some(b) = v {
                if !(0.0..1.0).contains(&b) {
                    return Err(j.err(key, "must be in [0, 1)"));
                }
            }
        }
        if cfg.num_train_timesteps.is_some_and(|n| n > 100_000) {
            return Err(j.err("num_train_timesteps", "unreasonably large"));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(v: Value) -> JsonFile {
        JsonFile {
            path: PathBuf::from("m/unet/config.json"),
            map: match v {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    fn sd15_unet() -> Value {
        json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"]
        })
    }

    #[test]
    fn sd15_unet_maps_to_candle() -> Result<()> {
        let c = UNetConfig::from_json(&file(sd15_unet()))?;
        assert_eq!(c.candle.blocks.len(), 4);
        assert_eq!(c.candle.blocks[0].use_cross_attn, Some(1));
        assert_eq!(c.candle.blocks[3].use_cross_attn, None);
        assert_eq!(c.candle.blocks[2].attention_head_dim, 8);
        assert_eq!(c.candle.cross_attention_dim, 768);
        assert!(!c.candle.use_linear_projection);

        // SD 2.x style: per-block head counts and linear projections.
        let mut v = sd15_unet();
        v["attention_head_dim"] = json!([5, 10, 20, 20]);
        v["use_linear_projection"] = json!(true);
        v["cross_attention_dim"] = json!(1024);
        let c = UNetConfig::from_json(&file(v))?;
        let heads: Vec<usize> = c
            .candle
            .blocks
            .iter()
            .map(|b| b.attention_head_dim)
            .collect();
        assert_eq!(heads, [5, 10, 20, 20]);
        assert!(c.candle.use_linear_projection);
        Ok(())
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("cross_attention_dim", json!(null)),
            ("block_out_channels", json!([320, 640])),
            ("attention_head_dim", json!([8, 8])),
            (
                "down_block_types",
                json!(["CrossAttnDownBlock2D", "Weird", "A", "B"]),
            ),
            ("norm_eps", json!("small")),
        ];
        for (key, value) in cases {
            let mut v = sd15_unet();
            v[key] = value;
            match UNetConfig::from_json(&file(v)) {
                Err(DiffusionError::Model { path, message }) => {
                    assert_eq!(path, "m/unet/config.json");
                    assert!(message.contains(key), "{key}: {message}");
                }
                other => panic!("{key}: expected a model error, got {other:?}"),
            }
        }
    }

    #[test]
    fn scheduler_config_keys() -> Result<()> {
        let c = SchedulerConfig::from_json(&file(json!({
            "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "trained_betas": null
        })))?;
        assert_eq!(c.beta_schedule, Some(BetaSchedule::ScaledLinear));
        assert_eq!(c.prediction_type, Some(PredictionType::VPrediction));
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(c.beta_start, None);
        for bad in [
            json!({"beta_schedule": "squaredcos_cap_v2"}),
            json!({"prediction_type": "sample"}),
            json!({"trained_betas": [0.1, 0.2]}),
        ] {
            assert!(SchedulerConfig::from_json(&file(bad)).is_err());
        }
        Ok(())
    }
}
