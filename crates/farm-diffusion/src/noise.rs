//! The seeded standard-normal draws (see the crate docs, "Randomness").
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::Result;

/// Stream of the `noise` draw (initial latents / noise added to an encoded image).
pub const NOISE_STREAM: u64 = 0;
/// Stream of Euler ancestral's per-step noise.
pub const ANCESTRAL_STREAM: u64 = 1;
/// Stream of the `vae_noise` draw (the posterior sample).
pub const VAE_NOISE_STREAM: u64 = 2;

/// The seed of image `index` of a batch that starts at `seed`.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// `n` standard-normal `f32` values from `ChaCha8Rng::seed_from_u64(seed)` on `stream`.
pub fn standard_normal(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// One draw per seed, stacked: `[seeds.len(), c, h, w]` on `device` in `dtype`.
pub fn batch(
    seeds: &[u64],
    stream: u64,
    (c, h, w): (usize, usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let values: Vec<f32> = seeds
        .iter()
        .flat_map(|&s| standard_normal(s, stream, c * h * w))
        .collect();
    Ok(
        Tensor::from_vec(values, (seeds.len(), c, h, w), &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?,
    )
}
