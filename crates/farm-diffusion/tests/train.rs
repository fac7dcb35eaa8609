//! Fine-tuning on the tiny model: every UNet tensor trains, resuming is exact, the output
//! folder is a loadable model, and bad datasets/configs give clear errors.
use std::path::Path;
use std::sync::OnceLock;

use farm_diffusion::candle_core::Tensor;
use farm_diffusion::config::{JsonFile, SchedulerConfig};
use farm_diffusion::train::{AdamWConfig, NoiseSchedule, TrainConfig, Trainer, UNetTrainer};
use farm_diffusion::{DType, Device, DiffusionError, Request, StableDiffusion};

/// The tiny model, written once for the whole test binary.
fn tiny() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        farm_diffusion::init_tiny(d.path(), 7).expect("init_tiny");
        d
    })
    .path()
}

/// A gradient image of `w x h` with a colour depending on `k`.
fn write_png(path: &Path, w: u32, h: u32, k: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8 ^ k, (y * 5) as u8, k.wrapping_mul(40)])
    });
    img.save(path).expect("write png");
}

/// Three images of different shapes with `.txt` captions.
fn caption_dataset() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for (i, (name, w, h, caption)) in [
        ("a", 80, 64, "a red square"),
        ("b", 64, 96, "a blue circle"),
        ("c", 64, 64, "a green triangle"),
    ]
    .into_iter()
    .enumerate()
    {
        write_png(&d.path().join(format!("{name}.png")), w, h, i as u8 * 60);
        std::fs::write(d.path().join(format!("{name}.txt")), caption).expect("caption");
    }
    d
}

fn config(data: &Path, batch: usize) -> TrainConfig {
    TrainConfig {
        batch_size: batch,
        resolution: Some(64),
        seed: 11,
        ..TrainConfig::new(tiny(), data)
    }
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.unet_trainer()
        .params()
        .snapshot()
        .expect("snapshot")
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.flatten_all().and_then(|v| v.to_vec1()).expect("values"),
            )
        })
        .collect()
}

#[test]
fn every_unet_tensor_trains() -> farm_diffusion::Result<()> {
    let sched = SchedulerConfig::from_json(&JsonFile::read(
        &tiny().join("scheduler/scheduler_config.json"),
    )?)?;
    // No weight decay: a tensor changes only through its gradient.
    let adamw = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut trainer = UNetTrainer::load(
        &tiny().join("unet"),
        NoiseSchedule::from_config(&sched)?,
        adamw,
        &Device::Cpu,
    )?;
    let before = trainer.params().snapshot()?;
    assert!(before.len() > 100, "{} tensors", before.len());
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?;
    let ctx = Tensor::randn(0f32, 1., (2, 77, 32), &dev)?;
    let noise = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?;
    trainer.step(&x0, &ctx, &[10, 900], &noise)?;
    let after = trainer.params().snapshot()?;
    let unchanged: Vec<&String> = before
        .iter()
        .filter(|(name, t)| {
            let diff = (*t - &after[*name])
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            diff == 0.0
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        unchanged.is_empty(),
        "tensors that did not train: {unchanged:?}"
    );
    // Specifically the ones candle's fused ops would cut off.
    for name in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
        "up_blocks.1.attentions.2.transformer_blocks.0.norm3.bias",
    ] {
        assert!(before.contains_key(name), "{name} exists");
        assert!(!unchanged.contains(&&name.to_owned()));
    }
    Ok(())
}

#[test]
fn resume_continues_exactly_and_output_is_a_model() -> farm_diffusion::Result<()> {
    let data = caption_dataset();
    let out = tempfile::tempdir()?;
    let cfg = config(data.path(), 2);

    // 4 steps in one go (2 epochs of 3 examples: data order crosses an epoch boundary).
    let mut straight = Trainer::new(&cfg, &Device::Cpu)?;
    let mut losses = Vec::new();
    for _ in 0..4 {
        losses.push(straight.step()?.loss);
    }
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    // 2 steps, checkpoint, a fresh trainer resumes, 2 more steps.
    let mut first = Trainer::new(&cfg, &Device::Cpu)?;
    let mut resumed_losses = vec![first.step()?.loss, first.step()?.loss];
    let ckpt = out.path().join("checkpoint-2");
    first.save_checkpoint(&ckpt)?;
    drop(first);
    for f in [
        "trainer_state.json",
        "optimizer.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    // A different seed on the command line: the checkpoint's RNG state wins.
    let mut second = Trainer::new(
        &TrainConfig {
            seed: 999,
            ..cfg.clone()
        },
        &Device::Cpu,
    )?;
    second.resume(&ckpt)?;
    assert_eq!(second.step_count(), 2);
    resumed_losses.push(second.step()?.loss);
    resumed_losses.push(second.step()?.loss);
    assert_eq!(losses, resumed_losses);
    assert!(
        weights(&straight) == weights(&second),
        "weights after 2 + resume + 2 steps differ from 4 steps"
    );

    // Resuming with another batch size is refused.
    let mut other = Trainer::new(&config(data.path(), 1), &Device::Cpu)?;
    match other.resume(&ckpt) {
        Err(DiffusionError::InvalidInput(m)) => assert!(m.contains("batch_size"), "{m}"),
        r => panic!("expected a batch size error, got {:?}", r.err()),
    }

    // The output folder loads and renders.
    let model_dir = out.path().join("model");
    second.save_model(&model_dir)?;
    let sd = StableDiffusion::load(&model_dir, &Device::Cpu, DType::F32)?;
    let img = sd.generate(
        &Request {
            prompt: "a red square".into(),
            width: 64,
            height: 64,
            steps: 2,
            ..Default::default()
        },
        &mut |_, _| true,
    )?;
    assert_eq!((img[0].width, img[0].height), (64, 64));
    let tuned = farm_diffusion::candle_core::safetensors::load(
        model_dir.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let base = farm_diffusion::candle_core::safetensors::load(
        tiny().join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    assert_eq!(tuned.len(), base.len());
    Ok(())
}

#[test]
fn run_writes_checkpoints_and_stops_on_cancel() -> farm_diffusion::Result<()> {
    let data = caption_dataset();
    let out = tempfile::tempdir()?;
    let mut t = Trainer::new(&config(data.path(), 1), &Device::Cpu)?;
    let mut seen = Vec::new();
    let r = t.run(10, out.path(), Some(2), &mut |rep| {
        seen.push(rep.step);
        rep.step < 3
    });
    assert!(matches!(r, Err(DiffusionError::Cancelled)), "{r:?}");
    assert_eq!(seen, vec![1, 2, 3]);
    assert!(out.path().join("checkpoint-2/trainer_state.json").is_file());
    assert!(
        !out.path().join("model_index.json").exists(),
        "nothing published"
    );
    Ok(())
}

#[test]
fn metadata_jsonl_dataset() -> farm_diffusion::Result<()> {
    let d = tempfile::tempdir()?;
    std::fs::create_dir(d.path().join("imgs"))?;
    write_png(&d.path().join("imgs/x.png"), 70, 70, 3);
    write_png(&d.path().join("y.png"), 64, 64, 9);
    std::fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"imgs/x.png\", \"text\": \"first\"}\n\n{\"file_name\": \"y.png\", \"text\": \" second \"}\n",
    )?;
    let ds = farm_diffusion::train::Dataset::open(d.path())?;
    let captions: Vec<&str> = ds.examples.iter().map(|e| e.caption.as_str()).collect();
    assert_eq!(captions, ["first", "second"]);
    let img = farm_diffusion::train::data::load_image(&ds.examples[0].image, 32, &Device::Cpu)?;
    assert_eq!(img.dims(), [3, 32, 32]);
    let (lo, hi) = (
        img.min_all()?.to_scalar::<f32>()?,
        img.max_all()?.to_scalar::<f32>()?,
    );
    assert!(
        (-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi),
        "{lo} {hi}"
    );
    Ok(())
}

fn invalid_message(data: &Path, resolution: usize) -> String {
    let cfg = TrainConfig {
        resolution: Some(resolution),
        ..TrainConfig::new(tiny(), data)
    };
    match Trainer::new(&cfg, &Device::Cpu) {
        Err(DiffusionError::InvalidInput(m)) => m,
        Err(e) => panic!("expected InvalidInput, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn clear_errors() -> farm_diffusion::Result<()> {
    let empty = tempfile::tempdir()?;
    assert!(invalid_message(empty.path(), 64).contains("is empty"));

    let no_caption = tempfile::tempdir()?;
    write_png(&no_caption.path().join("a.png"), 8, 8, 0);
    assert!(invalid_message(no_caption.path(), 64).contains("missing caption"));

    let bad = tempfile::tempdir()?;
    std::fs::write(bad.path().join("a.png"), b"not a png")?;
    std::fs::write(bad.path().join("a.txt"), "x")?;
    let m = invalid_message(bad.path(), 64);
    assert!(m.contains("unreadable image") && m.contains("a.png"), "{m}");

    let meta = tempfile::tempdir()?;
    write_png(&meta.path().join("a.png"), 8, 8, 0);
    std::fs::write(
        meta.path().join("metadata.jsonl"),
        "{\"file_name\": \"a.png\"}\n",
    )?;
    assert!(invalid_message(meta.path(), 64).contains("missing caption"));

    let data = caption_dataset();
    assert!(invalid_message(data.path(), 60).contains("multiple of 8"));
    // 8 is a multiple of 8 but not of the VAE factor times the UNet's downsampling.
    assert!(invalid_message(data.path(), 8).contains("multiple of 16"));
    Ok(())
}

#[test]
fn batch_order_is_a_permutation_per_epoch() {
    let n = 5;
    let order: Vec<usize> = (0..5)
        .flat_map(|s| farm_diffusion::train::batch_indices(3, n, 2, s))
        .collect();
    for epoch in order.chunks(n) {
        let mut e = epoch.to_vec();
        e.sort();
        assert_eq!(e, (0..n).collect::<Vec<_>>());
    }
    let again: Vec<usize> = (0..5)
        .flat_map(|s| farm_diffusion::train::batch_indices(3, n, 2, s))
        .collect();
    assert_eq!(order, again);
}

#[test]
fn trainer_can_move_to_a_worker_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Trainer>();
    assert_send::<UNetTrainer>();
}
