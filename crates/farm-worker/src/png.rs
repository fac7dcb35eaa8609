//! PNG encoding with the generation parameters in a `tEXt` chunk named `parameters`, so any
//! image can be reproduced from the file alone. The bytes depend only on the pixels and the
//! parameters (no timestamps), so the same task always gives the same file.

use farm_core::TaskSpec;
use farm_diffusion::RgbImage;
use serde::{Deserialize, Serialize};

pub const TEXT_KEY: &str = "parameters";

/// What the `parameters` chunk holds (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    pub mode: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// img2img and inpaint only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Storage key of the init image, for the modes that start from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
}

impl Parameters {
    pub fn of(spec: &TaskSpec) -> Self {
        Parameters {
            mode: spec.mode.as_str().to_string(),
            model: spec.model.clone(),
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            seed: spec.seed,
            width: spec.width,
            height: spec.height,
            steps: spec.steps,
            guidance_scale: spec.guidance_scale,
            scheduler: spec.scheduler.as_str().to_string(),
            strength: matches!(
                spec.mode,
                farm_core::Mode::Img2Img | farm_core::Mode::Inpaint
            )
            .then_some(spec.strength),
            init_image: spec.init_image.clone(),
            mask: spec.mask.clone(),
            vae: spec.vae.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error(transparent)]
    Encode(#[from] ::png::EncodingError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("image is {width}x{height} but has {len} bytes")]
    Size { width: u32, height: u32, len: usize },
}

pub fn encode(image: &RgbImage, params: &Parameters) -> Result<Vec<u8>, PngError> {
    encode_with_text(image, &ascii_json(&serde_json::to_string(params)?))
}

/// `tEXt` is Latin-1: escape every non-ASCII character as `\uXXXX` (valid JSON, since such
/// characters only occur inside strings), so any prompt survives.
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

pub fn encode_with_text(image: &RgbImage, text: &str) -> Result<Vec<u8>, PngError> {
    if image.pixels.len() != image.width as usize * image.height as usize * 3 {
        return Err(PngError::Size {
            width: image.width,
            height: image.height,
            len: image.pixels.len(),
        });
    }
    let mut out = Vec::new();
    {
        let mut encoder = ::png::Encoder::new(&mut out, image.width, image.height);
        encoder.set_color(::png::ColorType::Rgb);
        encoder.set_depth(::png::BitDepth::Eight);
        encoder.add_text_chunk(TEXT_KEY.to_string(), text.to_string())?;
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Reads the `parameters` chunk back, if the file has one.
pub fn read_parameters(bytes: &[u8]) -> Option<Parameters> {
    let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == TEXT_KEY)?;
    serde_json::from_str(&text.text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_the_round_trip() {
        let image = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![1, 2, 3, 4, 5, 6],
        };
        let params = Parameters {
            mode: "txt2img".into(),
            model: "tiny".into(),
            prompt: "an otter 🦦 in Zürich".into(),
            negative_prompt: String::new(),
            seed: 42,
            width: 2,
            height: 1,
            steps: 3,
            guidance_scale: 7.5,
            scheduler: "pndm".into(),
            strength: None,
            init_image: None,
            mask: None,
            vae: None,
        };
        let bytes = encode(&image, &params).expect("encode");
        assert_eq!(read_parameters(&bytes), Some(params.clone()));
        assert_eq!(
            bytes,
            encode(&image, &params).expect("encode"),
            "deterministic"
        );
        let bad = RgbImage {
            pixels: vec![0; 5],
            ..image
        };
        assert!(matches!(encode(&bad, &params), Err(PngError::Size { .. })));
    }
}
