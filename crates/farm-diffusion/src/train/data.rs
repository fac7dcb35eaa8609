//! Image–caption datasets.
//!
//! A dataset folder is either
//! * Hugging Face's imagefolder convention: a `metadata.jsonl` whose lines are JSON objects
//!   with `file_name` (relative to the folder) and `text` (the caption); or
//! * images with a caption file of the same name: `cat.png` + `cat.txt`.
//!
//! Images are resized so that their shorter side is the resolution (bilinear, aspect ratio
//! kept), centre-cropped to a square, and scaled to `[-1, 1]`. Decoding supports the
//! formats the `image` crate is built with in this workspace (PNG).
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;

use crate::{DiffusionError, Result};

/// Extensions treated as images in a folder without `metadata.jsonl`.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tiff"];

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub image: PathBuf,
    pub caption: String,
}

/// The examples of a dataset folder, in a stable order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
}

fn invalid(m: String) -> DiffusionError {
    DiffusionError::InvalidInput(m)
}

impl Dataset {
    /// Lists and checks a dataset folder: every caption must exist and every image's
    /// header must be readable. Errors name the offending file.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(invalid(format!(
                "dataset {}: not a directory",
                dir.display()
            )));
        }
        let metadata = dir.join("metadata.jsonl");
        let examples = if metadata.is_file() {
            Self::from_metadata(dir, &metadata)?
        } else {
            Self::from_captions(dir)?
        };
        if examples.is_empty() {
            return Err(invalid(format!(
                "dataset {} is empty: expected images with same-named .txt captions, or a \
                 metadata.jsonl with file_name and text",
                dir.display()
            )));
        }
        for e in &examples {
            image::ImageReader::open(&e.image)
                .and_then(|r| r.with_guessed_format())
                .map_err(|err| unreadable(&e.image, &err.to_string()))?
                .into_dimensions()
                .map_err(|err| unreadable(&e.image, &err.to_string()))?;
        }
        Ok(Self { examples })
    }

    fn from_metadata(dir: &Path, metadata: &Path) -> Result<Vec<Example>> {
        let text = std::fs::read_to_string(metadata)?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("{} line {}", metadata.display(), i + 1);
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| invalid(format!("{}: not JSON: {e}", at())))?;
            let Some(file) = v.get("file_name").and_then(|f| f.as_str()) else {
                return Err(invalid(format!("{}: missing string `file_name`", at())));
            };
            let rel = Path::new(file);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(invalid(format!(
                    "{}: file_name {file:?} must be a path inside the dataset folder",
                    at()
                )));
            }
            let Some(caption) = v.get("text").and_then(|t| t.as_str()) else {
                return Err(invalid(format!(
                    "{}: missing caption: no string `text` for {file:?}",
                    at()
                )));
            };
            let image = dir.join(rel);
            if !image.is_file() {
                return Err(invalid(format!(
                    "{}: image {} does not exist",
                    at(),
                    image.display()
                )));
            }
            out.push(Example {
                image,
                caption: caption.trim().to_owned(),
            });
        }
        Ok(out)
    }

    fn from_captions(dir: &Path) -> Result<Vec<Example>> {
        let mut images: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        images.sort();
        images
            .into_iter()
            .map(|image| {
                let txt = image.with_extension("txt");
                let caption = std::fs::read_to_string(&txt).map_err(|e| {
                    invalid(format!(
                        "missing caption for {}: cannot read {}: {e}",
                        image.display(),
                        txt.display()
                    ))
                })?;
                Ok(Example {
                    image,
                    caption: caption.trim().to_owned(),
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

fn unreadable(path: &Path, err: &str) -> DiffusionError {
    invalid(format!("unreadable image {}: {err}", path.display()))
}

/// Decodes `path`, resizes its shorter side to `resolution`, centre-crops it to a square
/// and returns `[3, resolution, resolution]` in `[-1, 1]` (`f32`, on `device`).
pub fn load_image(path: &Path, resolution: usize, device: &Device) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| unreadable(path, &e.to_string()))?
        .decode()
        .map_err(|e| unreadable(path, &e.to_string()))?
        .to_rgb8();
    let pixels = preprocess(&img, resolution)?;
    let values: Vec<f32> = pixels
        .iter()
        .map(|&p| f32::from(p) / 255.0 * 2.0 - 1.0)
        .collect();
    Ok(
        Tensor::from_vec(values, (resolution, resolution, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .contiguous()?
            .to_device(device)?,
    )
}

/// Resize (shorter side to `r`, bilinear) and centre crop (torchvision's rounding).
pub fn preprocess(img: &image::RgbImage, r: usize) -> Result<Vec<u8>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(invalid("empty image".into()));
    }
    let (nw, nh) = if w <= h {
        (
            r,
            ((h * r) as f64 / w as f64).round().max(r as f64) as usize,
        )
    } else {
        (
            ((w * r) as f64 / h as f64).round().max(r as f64) as usize,
            r,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw as u32, nh as u32, FilterType::Triangle)
    };
    let left = ((nw - r) as f64 / 2.0).round() as u32;
    let top = ((nh - r) as f64 / 2.0).round() as u32;
    let cropped = image::imageops::crop_imm(&resized, left, top, r as u32, r as u32).to_image();
    Ok(cropped.into_raw())
}
