//! Parity with diffusers on a tiny random SD model: the fixtures in `fixtures/parity` are
//! written by `scripts/parity/make_fixtures.py` (diffusers' own pipelines, fixed noise).
//! Images must reach PSNR >= 45 dB against diffusers' output.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use farm_diffusion::{
    DType, Device, DiffusionError, Mode, Request, RgbImage, SchedulerKind, StableDiffusion,
};
use serde_json::Value;

const MIN_PSNR: f64 = 45.0;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn model() -> &'static StableDiffusion {
    static M: OnceLock<StableDiffusion> = OnceLock::new();
    M.get_or_init(|| {
        StableDiffusion::load(&dir().join("model"), &Device::Cpu, DType::F32).expect("load")
    })
}

fn cases() -> &'static Value {
    static C: OnceLock<Value> = OnceLock::new();
    C.get_or_init(|| {
        let text = std::fs::read_to_string(dir().join("cases.json")).expect("cases.json");
        serde_json::from_str(&text).expect("cases.json is JSON")
    })
}

fn read_png(path: &Path) -> RgbImage {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    let pixels = match info.color_type {
        png::ColorType::Rgb => buf,
        png::ColorType::Rgba => buf
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g]).collect(),
        other => panic!("unsupported PNG colour type {other:?}"),
    };
    RgbImage {
        width: info.width,
        height: info.height,
        pixels,
    }
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "image sizes differ"
    );
    let mse = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.pixels.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn tensors(path: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn request(case: &Value) -> Request {
    let s = |k: &str| case[k].as_str().unwrap_or_default().to_owned();
    let u = |k: &str| case[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    let mut noise = tensors(&dir().join(s("noise")));
    let image = |k: &str| case[k].as_str().map(|f| read_png(&dir().join(f)));
    Request {
        mode: s("mode").parse().expect("mode"),
        prompt: s("prompt"),
        negative_prompt: s("negative_prompt"),
        width: u("width"),
        height: u("height"),
        steps: u("steps"),
        guidance_scale: case["guidance"].as_f64().expect("guidance"),
        scheduler: s("scheduler").parse().expect("scheduler"),
        seed: 0,
        num_images: u("num_images"),
        strength: case["strength"].as_f64().expect("strength"),
        init_image: image("init_image"),
        mask: image("mask"),
        noise: noise.remove("noise"),
        vae_noise: noise.remove("vae_noise"),
    }
}

fn find_case(name: &str) -> &'static Value {
    cases()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn check_case(name: &str) {
    let case = find_case(name);
    let req = request(case);
    let images = model().generate(&req, &mut |_, _| true).expect("generate");
    let expected = case["expected"].as_array().expect("expected");
    assert_eq!(images.len(), expected.len(), "{name}: number of images");
    for (img, file) in images.iter().zip(expected) {
        let want = read_png(&dir().join(file.as_str().expect("file name")));
        let p = psnr(img, &want);
        eprintln!("parity {name} {file}: PSNR {p:.2} dB");
        assert!(p >= MIN_PSNR, "{name} {file}: PSNR {p:.2} dB < {MIN_PSNR}");
    }
}

macro_rules! parity {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { check_case(stringify!($name)); })*
    };
}

parity!(
    txt2img_pndm,
    txt2img_ddim,
    txt2img_dpm,
    txt2img_nonsquare,
    txt2img_batch2,
    txt2img_guidance1,
    img2img_pndm,
    img2img_dpm,
    inpaint_ddim,
    reconstruct,
);

/// The threshold is meaningful: one step fewer, or another scheduler, falls below it.
#[test]
fn parity_detects_wrong_settings() {
    let case = find_case("txt2img_pndm");
    let want = read_png(&dir().join(case["expected"][0].as_str().expect("file")));
    let base = request(case);
    for (what, req) in [
        (
            "one step fewer",
            Request {
                steps: base.steps - 1,
                ..base.clone()
            },
        ),
        (
            "ddim instead of pndm",
            Request {
                scheduler: SchedulerKind::Ddim,
                ..base.clone()
            },
        ),
    ] {
        let got = model().generate(&req, &mut |_, _| true).expect("generate");
        let p = psnr(&got[0], &want);
        eprintln!("parity negative control ({what}): PSNR {p:.2} dB");
        assert!(
            p < MIN_PSNR,
            "{what}: PSNR {p:.2} dB should be below {MIN_PSNR}"
        );
    }
}

#[test]
fn text_embeddings_match_transformers() {
    let want = tensors(&dir().join("embed.safetensors"));
    let ids = want["input_ids"].to_vec2::<i64>().expect("ids");
    let emb = &want["embeddings"];
    let prompts = cases()["prompts"].as_array().expect("prompts");
    for (i, prompt) in prompts.iter().enumerate() {
        let prompt = prompt.as_str().expect("prompt");
        let (our_ids, ours) = model().embed(prompt).expect("embed");
        let our_ids: Vec<i64> = our_ids.into_iter().map(i64::from).collect();
        assert_eq!(our_ids, ids[i], "{prompt:?}: token ids");
        let diff = (ours.get(0).expect("row") - emb.get(i).expect("row"))
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff");
        eprintln!("parity embeddings {prompt:?}: max abs error {diff:e}");
        assert!(diff < 1e-3, "{prompt:?}: max abs error {diff}");
    }
}

/// Images of a batch of 4 equal the same seeds run one by one, for every mode.
#[test]
fn batch_of_four_equals_single_runs() {
    let init = read_png(&dir().join("init.png"));
    let mask = read_png(&dir().join("mask.png"));
    for (mode, scheduler) in [
        (Mode::Txt2Img, SchedulerKind::EulerAncestral),
        (Mode::Inpaint, SchedulerKind::Pndm),
    ] {
        let base = Request {
            mode,
            prompt: "a red bicycle".into(),
            negative_prompt: "blurry".into(),
            width: 64,
            height: 64,
            steps: 4,
            scheduler,
            seed: 40,
            num_images: 4,
            strength: 0.7,
            init_image: mode.needs_init_image().then(|| init.clone()),
            mask: (mode == Mode::Inpaint).then(|| mask.clone()),
            ..Default::default()
        };
        let batch = model().generate(&base, &mut |_, _| true).expect("batch");
        assert_eq!(batch.len(), 4);
        for (i, img) in batch.iter().enumerate() {
            let single = Request {
                seed: base.seed + i as u64,
                num_images: 1,
                ..base.clone()
            };
            let one = model().generate(&single, &mut |_, _| true).expect("single");
            let p = psnr(img, &one[0]);
            eprintln!("batch invariance {mode} image {i}: PSNR {p:.2} dB");
            assert!(p >= MIN_PSNR, "{mode} image {i}: PSNR {p:.2} dB");
        }
        assert_ne!(
            batch[0].pixels, batch[1].pixels,
            "{mode}: seeds must differ"
        );
    }
}

fn invalid(req: &Request) -> String {
    match model().generate(req, &mut |_, _| true) {
        Err(DiffusionError::InvalidInput(m)) => m,
        Err(e) => panic!("expected InvalidInput, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_inputs_have_their_own_errors() {
    let init = read_png(&dir().join("init.png"));
    let img2img = Request {
        mode: Mode::Img2Img,
        width: 64,
        height: 64,
        steps: 2,
        init_image: Some(init.clone()),
        ..Default::default()
    };
    for s in [-0.1, 1.5, f64::NAN] {
        let m = invalid(&Request {
            strength: s,
            ..img2img.clone()
        });
        assert!(m.contains("strength"), "{m}");
    }
    let m = invalid(&Request {
        width: 60,
        ..img2img.clone()
    });
    assert!(m.contains("multiple of 8"), "{m}");
    let m = invalid(&Request {
        mode: Mode::Txt2Img,
        width: 100,
        height: 64,
        ..Default::default()
    });
    assert!(m.contains("multiple of 8"), "{m}");
    let m = invalid(&Request {
        init_image: None,
        ..img2img.clone()
    });
    assert!(m.contains("init image"), "{m}");
    // A 32x32 mask (same aspect) is resized; a 64x32 one is refused.
    let square = |side: u32, h: u32| RgbImage {
        width: side,
        height: h,
        pixels: vec![255; (side * h * 3) as usize],
    };
    let inpaint = Request {
        mode: Mode::Inpaint,
        mask: Some(square(32, 32)),
        ..img2img.clone()
    };
    assert!(model().generate(&inpaint, &mut |_, _| true).is_ok());
    let m = invalid(&Request {
        mask: Some(square(64, 32)),
        ..inpaint.clone()
    });
    assert!(m.contains("aspect ratio"), "{m}");
    let m = invalid(&Request {
        mask: None,
        ..inpaint.clone()
    });
    assert!(m.contains("mask"), "{m}");
    let m = invalid(&Request {
        noise: Some(candle_core::Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).expect("t")),
        ..img2img.clone()
    });
    assert!(m.contains("noise"), "{m}");
    assert!("warp-drive".parse::<SchedulerKind>().is_err());
    assert!("paint".parse::<Mode>().is_err());
}

#[test]
fn missing_model_file_names_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("m");
    copy_dir(&dir().join("model"), &copy);
    std::fs::remove_file(copy.join("unet/diffusion_pytorch_model.safetensors")).expect("rm");
    match StableDiffusion::load(&copy, &Device::Cpu, DType::F32) {
        Err(DiffusionError::Model { path, message }) => {
            assert!(
                path.ends_with("unet/diffusion_pytorch_model.safetensors"),
                "{path}"
            );
            assert!(message.contains("missing"), "{message}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("loaded without UNet weights"),
    }
}

/// A separate VAE folder replaces the model's.
#[test]
fn separate_vae_folder() {
    let vae = dir().join("model/vae");
    let m =
        StableDiffusion::load_with_vae(&dir().join("model"), Some(&vae), &Device::Cpu, DType::F32)
            .expect("load with vae");
    let req = Request {
        mode: Mode::Reconstruct,
        width: 64,
        height: 64,
        init_image: Some(read_png(&dir().join("init.png"))),
        ..Default::default()
    };
    let a = m.generate(&req, &mut |_, _| true).expect("a");
    let b = model().generate(&req, &mut |_, _| true).expect("b");
    assert_eq!(a, b);
    let bad = StableDiffusion::load_with_vae(
        &dir().join("model"),
        Some(Path::new("/nonexistent/vae")),
        &Device::Cpu,
        DType::F32,
    );
    assert!(matches!(bad, Err(DiffusionError::Model { .. })));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}
