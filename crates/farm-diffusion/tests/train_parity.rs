//! Training parity with diffusers + PyTorch: `fixtures/train/<case>` are written by
//! `scripts/parity/train_fixtures.py` (diffusers' UNet, DDPMScheduler.add_noise, MSE,
//! torch.optim.AdamW with its defaults). From the same weights and inputs, one step must
//! give the same loss and the same updated weights (relative error <= 1e-4); the gradients
//! and a second step (AdamW's moments and bias correction) are checked too.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use farm_diffusion::candle_core::{DType, Device, Tensor};
use farm_diffusion::config::{JsonFile, SchedulerConfig};
use farm_diffusion::train::{AdamWConfig, NoiseSchedule, UNetTrainer};

const MAX_REL: f64 = 1e-4;

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(case)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    farm_diffusion::candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor values")
}

/// `||a - b|| / ||b||`.
fn norm_rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// `max |a - b| / max(|b|, 1e-3)` element-wise (weights are O(0.1)).
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
        .fold(0.0, f64::max)
}

struct Figures {
    loss_rel: f64,
    loss2_rel: f64,
    grad_rel: f64,
    after_rel: f64,
    delta_rel: f64,
    after2_rel: f64,
}

fn run_case(case: &str) -> Figures {
    let d = dir(case);
    let sched = SchedulerConfig::from_json(
        &JsonFile::read(&d.join("scheduler/scheduler_config.json")).expect("scheduler config"),
    )
    .expect("scheduler config");
    let schedule = NoiseSchedule::from_config(&sched).expect("schedule");
    let mut trainer = UNetTrainer::load(
        &d.join("unet"),
        schedule,
        AdamWConfig::default(),
        &Device::Cpu,
    )
    .expect("load the fixture UNet");
    let inputs = load(&d.join("inputs.safetensors"));
    let expected = load(&d.join("expected.safetensors"));
    let x0 = &inputs["latents"];
    let ctx = &inputs["encoder_hidden_states"];
    let noise = &inputs["noise"];
    let timesteps: Vec<u32> = inputs["timesteps"]
        .to_vec1::<i64>()
        .expect("timesteps")
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let before = trainer.params().snapshot().expect("snapshot");

    // Gradients.
    let loss = trainer.loss(x0, ctx, &timesteps, noise).expect("loss");
    let grads = loss.backward().expect("backward");
    let mut grad_rel: f64 = 0.0;
    for (name, var) in trainer.params().vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let want = &expected[&format!("grad.{name}")];
        grad_rel = grad_rel.max(norm_rel(&values(g), &values(want)));
    }

    let loss = trainer.step(x0, ctx, &timesteps, noise).expect("step 1") as f64;
    let want_loss = values(&expected["loss"])[0];
    let loss_rel = (loss - want_loss).abs() / want_loss.abs();
    let (mut after_rel, mut delta_rel): (f64, f64) = (0.0, 0.0);
    let after = trainer.params().snapshot().expect("snapshot");
    assert_eq!(
        after.len(),
        expected.keys().filter(|k| k.starts_with("after.")).count(),
        "every torch parameter is trained"
    );
    for (name, t) in &after {
        let ours = values(t);
        let want = values(&expected[&format!("after.{name}")]);
        after_rel = after_rel.max(max_rel(&ours, &want));
        let b = values(&before[name]);
        let d_ours: Vec<f64> = ours.iter().zip(&b).map(|(x, y)| x - y).collect();
        let d_want: Vec<f64> = want.iter().zip(&b).map(|(x, y)| x - y).collect();
        delta_rel = delta_rel.max(norm_rel(&d_ours, &d_want));
    }

    let loss2 = trainer.step(x0, ctx, &timesteps, noise).expect("step 2") as f64;
    let want2 = values(&expected["loss2"])[0];
    let loss2_rel = (loss2 - want2).abs() / want2.abs();
    let mut after2_rel: f64 = 0.0;
    for (name, t) in trainer.params().snapshot().expect("snapshot") {
        let want = values(&expected[&format!("after2.{name}")]);
        after2_rel = after2_rel.max(max_rel(&values(&t), &want));
    }
    let f = Figures {
        loss_rel,
        loss2_rel,
        grad_rel,
        after_rel,
        delta_rel,
        after2_rel,
    };
    eprintln!(
        "{case}: loss {loss:.6} (torch {want_loss:.6}, rel {:.2e}); step 2 loss rel {:.2e}; \
         gradients max ||dg||/||g|| {:.2e}; weights after step 1 max rel {:.2e}, \
         update max ||d delta||/||delta|| {:.2e}; weights after step 2 max rel {:.2e}",
        f.loss_rel, f.loss2_rel, f.grad_rel, f.after_rel, f.delta_rel, f.after2_rel
    );
    f
}

fn check(case: &str) {
    let f = run_case(case);
    assert!(f.loss_rel <= MAX_REL, "{case}: loss rel {}", f.loss_rel);
    assert!(f.loss2_rel <= MAX_REL, "{case}: loss 2 rel {}", f.loss2_rel);
    assert!(f.grad_rel <= MAX_REL, "{case}: gradient rel {}", f.grad_rel);
    assert!(
        f.after_rel <= MAX_REL,
        "{case}: weights rel {}",
        f.after_rel
    );
    assert!(
        f.after2_rel <= MAX_REL,
        "{case}: weights (step 2) rel {}",
        f.after2_rel
    );
    // The update itself (about lr * sign(g)) must match closely too, not just the weights.
    assert!(f.delta_rel <= 1e-3, "{case}: update rel {}", f.delta_rel);
}

#[test]
fn one_step_matches_pytorch_epsilon() {
    check("eps");
}

#[test]
fn one_step_matches_pytorch_v_prediction_linear_projection() {
    check("vpred");
}
