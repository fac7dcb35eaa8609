//! Local one-shot commands that run the engine in this process, without any farm service:
//! `farm generate`, `farm embed` and `farm model pull`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use farm_diffusion::candle_core::{self, Tensor};
use farm_diffusion::{Device, Mode, Request, RgbImage, SchedulerKind, StableDiffusion};

#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    /// Model folder (diffusers layout), or a model name under FARM_MODELS.
    #[arg(long)]
    pub model: PathBuf,
    /// A VAE folder replacing the model's (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// txt2img, img2img, inpaint or reconstruct.
    #[arg(long, default_value = "txt2img")]
    pub mode: String,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// PNG to start from (img2img, inpaint, reconstruct).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting mask PNG: white = repaint, black = keep.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// img2img/inpaint: how much of the schedule to run, in [0, 1].
    #[arg(long, default_value_t = 0.8, allow_hyphen_values = true)]
    pub strength: f64,
    /// Default: the init image's width, else 512.
    #[arg(long)]
    pub width: Option<usize>,
    /// Default: the init image's height, else 512.
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5, allow_hyphen_values = true)]
    pub guidance: f64,
    /// pndm, ddim, dpm++ or euler-a.
    #[arg(long, default_value = "pndm")]
    pub scheduler: String,
    /// Image i of the batch uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// safetensors file with `noise` (f32 [N, 4, H/8, W/8]) and optionally `vae_noise`,
    /// used instead of the seed's draws.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write all images side by side into this PNG.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Output PNG; with N > 1 images: PATH_0.png ... PATH_{N-1}.png.
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct EmbedArgs {
    /// Model folder (diffusers layout), or a model name under FARM_MODELS.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// safetensors file to write: `input_ids` (i64 [1, 77]) and `embeddings` (f32).
    #[arg(long)]
    pub output: PathBuf,
}

/// A model folder given as a path, or as a name under the models root.
fn model_dir(model: &Path, models: &Path) -> anyhow::Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let named = models.join(model);
    if model.components().count() == 1 && named.is_dir() {
        return Ok(named);
    }
    bail!(
        "model folder {} does not exist (nor {})",
        model.display(),
        named.display()
    )
}

/// Reads a PNG as 8-bit RGB.
pub fn read_image(path: &Path, what: &str) -> anyhow::Result<RgbImage> {
    let img = image::open(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?
        .to_rgb8();
    let (width, height) = img.dimensions();
    Ok(RgbImage {
        width,
        height,
        pixels: img.into_raw(),
    })
}

fn to_image(img: RgbImage) -> anyhow::Result<image::RgbImage> {
    image::RgbImage::from_raw(img.width, img.height, img.pixels)
        .context("the engine returned a malformed image")
}

/// `out.png` for one image, `out_0.png`, `out_1.png`, ... for several.
pub fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}_{i}.{ext}")))
        .collect()
}

/// Reads `noise` / `vae_noise` from a safetensors file.
fn read_noise(path: &Path) -> anyhow::Result<(Option<Tensor>, Option<Tensor>)> {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read the noise file {}", path.display()))?;
    let noise = tensors.remove("noise");
    let vae_noise = tensors.remove("vae_noise");
    if noise.is_none() && vae_noise.is_none() {
        bail!(
            "the noise file {} holds neither `noise` nor `vae_noise`",
            path.display()
        );
    }
    Ok((noise, vae_noise))
}

pub async fn generate(args: GenerateArgs, models: PathBuf) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || generate_blocking(args, &models))
        .await
        .context("the generation thread panicked")?
}

fn generate_blocking(args: GenerateArgs, models: &Path) -> anyhow::Result<()> {
    let mode: Mode = args.mode.parse()?;
    let scheduler: SchedulerKind = args.scheduler.parse()?;
    let dtype = farm_diffusion::parse_dtype(&args.dtype)?;
    if !(0.0..=1.0).contains(&args.strength) {
        bail!("--strength must be in [0, 1], got {}", args.strength);
    }
    if args.mask.is_some() && mode != Mode::Inpaint {
        bail!("--mask is only used with --mode inpaint");
    }
    let init_image = match (&args.init_image, mode.needs_init_image()) {
        (Some(p), true) => Some(read_image(p, "init image")?),
        (None, true) => bail!("--mode {mode} needs --init-image"),
        (Some(_), false) => bail!("--init-image is not used with --mode {mode}"),
        (None, false) => None,
    };
    let mask = match (&args.mask, mode) {
        (Some(p), _) => Some(read_image(p, "mask")?),
        (None, Mode::Inpaint) => bail!("--mode inpaint needs --mask"),
        (None, _) => None,
    };
    let (default_w, default_h) = init_image
        .as_ref()
        .map(|i| (i.width as usize, i.height as usize))
        .unwrap_or((512, 512));
    let (width, height) = (
        args.width.unwrap_or(default_w),
        args.height.unwrap_or(default_h),
    );
    if let Some(img) = &init_image {
        if (img.width as usize, img.height as usize) != (width, height) {
            bail!(
                "the init image is {}x{} but --width/--height ask for {width}x{height}; \
                 resize the image or leave out --width/--height",
                img.width,
                img.height
            );
        }
    }
    let (noise, vae_noise) = match &args.noise {
        Some(p) => read_noise(p)?,
        None => (None, None),
    };
    let device = farm_diffusion::parse_device(&args.device)?;
    let dir = model_dir(&args.model, models)?;
    let vae_dir = args.vae.as_deref();
    if let Some(v) = vae_dir {
        if !v.is_dir() {
            bail!("VAE folder {} does not exist", v.display());
        }
    }
    let model = StableDiffusion::load_with_vae(&dir, vae_dir, &device, dtype)
        .with_context(|| format!("cannot load the model {}", dir.display()))?;
    let req = Request {
        mode,
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler,
        seed: args.seed,
        num_images: args.num_images,
        strength: args.strength,
        init_image,
        mask,
        noise,
        vae_noise,
    };
    let start = std::time::Instant::now();
    let images = model.generate(&req, &mut |done, total| {
        tracing::debug!(done, total, "step");
        true
    })?;
    let paths = output_paths(&args.output, images.len());
    let images = images
        .into_iter()
        .map(to_image)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (img, path) in images.iter().zip(&paths) {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        img.save(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    if let Some(grid_path) = &args.grid {
        let cols = u32::try_from(images.len()).context("too many images")?;
        let grid = crate::grid::grid(&images, 1, cols)?;
        grid.save(grid_path)
            .with_context(|| format!("cannot write {}", grid_path.display()))?;
        println!("{}", grid_path.display());
    }
    tracing::info!(
        mode = %mode,
        images = images.len(),
        secs = start.elapsed().as_secs_f64(),
        "generated"
    );
    Ok(())
}

pub async fn embed(args: EmbedArgs, models: PathBuf) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let dir = model_dir(&args.model, &models)?;
        let model = StableDiffusion::load(&dir, &Device::Cpu, farm_diffusion::DType::F32)
            .with_context(|| format!("cannot load the model {}", dir.display()))?;
        let (ids, embeddings) = model.embed(&args.prompt)?;
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
        let embeddings = embeddings.to_dtype(farm_diffusion::DType::F32)?;
        let tensors = HashMap::from([
            ("input_ids".to_string(), ids),
            ("embeddings".to_string(), embeddings),
        ]);
        candle_core::safetensors::save(&tensors, &args.output)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        println!("{}", args.output.display());
        Ok(())
    })
    .await
    .context("the embedding thread panicked")?
}

pub async fn pull(repo: String, revision: Option<String>, models: PathBuf) -> anyhow::Result<()> {
    let dir = tokio::task::spawn_blocking(move || {
        farm_diffusion::hub::pull(&repo, revision.as_deref(), &models)
    })
    .await
    .context("the download thread panicked")??;
    println!("{}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../farm-diffusion/tests/fixtures/parity")
    }

    fn args(out: &Path) -> GenerateArgs {
        GenerateArgs {
            model: fixtures().join("model"),
            vae: None,
            mode: "txt2img".into(),
            prompt: "a photograph of an astronaut riding a horse".into(),
            negative_prompt: "blurry, low quality".into(),
            init_image: None,
            mask: None,
            strength: 0.8,
            width: Some(64),
            height: Some(64),
            steps: 10,
            guidance: 7.5,
            scheduler: "ddim".into(),
            seed: 0,
            num_images: 2,
            noise: Some(fixtures().join("txt2img_batch2.noise.safetensors")),
            dtype: "f32".into(),
            device: "cpu".into(),
            grid: Some(out.join("grid.png")),
            output: out.join("img.png"),
        }
    }

    #[test]
    fn generate_writes_numbered_images_matching_diffusers() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        generate_blocking(args(tmp.path()), tmp.path())?;
        for i in 0..2 {
            let ours = read_image(&tmp.path().join(format!("img_{i}.png")), "output")?;
            let theirs = read_image(
                &fixtures().join(format!("txt2img_batch2_{i}.png")),
                "fixture",
            )?;
            let mse = ours
                .pixels
                .iter()
                .zip(&theirs.pixels)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum::<f64>()
                / ours.pixels.len() as f64;
            assert!(mse < 1.0, "image {i}: mse {mse}");
        }
        let grid = read_image(&tmp.path().join("grid.png"), "grid")?;
        assert_eq!((grid.width, grid.height), (128, 64));
        Ok(())
    }

    #[test]
    fn bad_inputs_are_refused_with_their_own_message() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let junk = tmp.path().join("junk.png");
        std::fs::write(&junk, b"not a png")?;
        let base = GenerateArgs {
            num_images: 1,
            noise: None,
            grid: None,
            steps: 2,
            ..args(tmp.path())
        };
        let cases: Vec<(GenerateArgs, &str)> = vec![
            (
                GenerateArgs {
                    mode: "img2img".into(),
                    init_image: Some(junk.clone()),
                    ..base.clone()
                },
                "cannot read the init image",
            ),
            (
                GenerateArgs {
                    mode: "img2img".into(),
                    init_image: Some(fixtures().join("init.png")),
                    strength: 1.5,
                    ..base.clone()
                },
                "--strength must be in [0, 1]",
            ),
            (
                GenerateArgs {
                    scheduler: "karras".into(),
                    ..base.clone()
                },
                "unknown scheduler",
            ),
            (
                GenerateArgs {
                    model: tmp.path().join("no-model"),
                    ..base.clone()
                },
                "does not exist",
            ),
        ];
        for (a, want) in cases {
            let err = match generate_blocking(a, tmp.path()) {
                Err(e) => format!("{e:#}"),
                Ok(()) => panic!("expected an error containing {want:?}"),
            };
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        Ok(())
    }

    #[test]
    fn batch_outputs_are_numbered() {
        assert_eq!(
            output_paths(Path::new("out/a.png"), 1),
            vec![PathBuf::from("out/a.png")]
        );
        assert_eq!(
            output_paths(Path::new("out/a.png"), 2),
            vec![PathBuf::from("out/a_0.png"), PathBuf::from("out/a_1.png")]
        );
    }
}
