//! farm-diffusion's CPU UNet against candle-transformers' `UNet2DConditionModel` on the same
//! random weights: the two must agree up to float rounding and the GELU form (candle's GEGLU
//! uses the tanh approximation, ours the exact erf of diffusers).
use std::path::Path;

use candle_nn::{VarBuilder, VarMap};
use farm_diffusion::candle_core::{DType, Device, Tensor};
use farm_diffusion::config::{JsonFile, UNetConfig};
use farm_diffusion::unet::{UNet, UNetEngine};

fn config(linear_projection: bool) -> UNetConfig {
    let json = serde_json::json!({
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 24,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "in_channels": 4,
        "out_channels": 4,
        "use_linear_projection": linear_projection,
    });
    UNetConfig::from_json(&JsonFile::from_value(Path::new("unet/config.json"), json).unwrap())
        .unwrap()
}

/// Relative RMS difference and the largest absolute difference.
fn compare(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let d = (a - b).unwrap();
    let rms = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let max = d
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (rms(&d) / rms(b), max)
}

fn check(linear_projection: bool, h: usize, w: usize) {
    let dev = Device::Cpu;
    let config = config(linear_projection);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let candle = UNet::new(vb.clone(), &config, UNetEngine::Candle).unwrap();
    let ours = UNet::new(vb, &config, UNetEngine::Auto).unwrap();
    assert_eq!(candle.engine(), UNetEngine::Candle);
    assert_eq!(ours.engine(), UNetEngine::Cpu);

    let x = Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev).unwrap();
    for t in [999.0, 1.0] {
        let want = candle.forward(&x, t, &ctx).unwrap();
        let got = ours.forward(&x, t, &ctx).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (rel, max) = compare(&got, &want);
        eprintln!(
            "linear={linear_projection} {h}x{w} t={t}: relative rms {rel:.2e}, max {max:.2e}"
        );
        assert!(rel < 2e-3, "relative RMS difference {rel}");
    }
}

#[test]
fn cpu_unet_matches_candle() {
    check(false, 8, 8);
}

#[test]
fn cpu_unet_matches_candle_with_linear_projection_and_odd_sizes() {
    check(true, 9, 7);
}

#[test]
fn cpu_engine_refuses_other_dtypes_and_bad_inputs() {
    let dev = Device::Cpu;
    let config = config(false);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F16, &dev);
    let err = UNet::new(vb, &config, UNetEngine::Cpu).unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");

    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let ours = UNet::new(vb, &config, UNetEngine::Cpu).unwrap();
    let x = Tensor::zeros((2, 4, 8, 8), DType::F32, &dev).unwrap();
    let ctx = Tensor::zeros((1, 5, 24), DType::F32, &dev).unwrap();
    let err = ours.forward(&x, 1.0, &ctx).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert!("CPU".parse::<UNetEngine>().is_ok());
    assert!("gpu".parse::<UNetEngine>().is_err());
}
