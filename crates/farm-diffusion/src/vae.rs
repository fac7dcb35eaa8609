//! The VAE (diffusers' `AutoencoderKL`): candle-transformers' decoder, plus an encoder built
//! here from candle's public blocks so that the posterior's mean and standard deviation are
//! available (candle's `DiagonalGaussianDistribution` only samples with the device RNG).
//!
//! The encoder mirrors diffusers' `Encoder`: `conv_in`, one `DownEncoderBlock2D` per entry
//! of `block_out_channels` (downsampling in all but the last, padding 0), a
//! `UNetMidBlock2D` with one attention head, `conv_norm_out`, SiLU, `conv_out` to
//! `2 * latent_channels`, then `quant_conv`. The log-variance is clamped to `[-30, 20]` as
//! diffusers' `DiagonalGaussianDistribution` does.
use candle_core::{Module, Tensor};
use candle_nn as nn;
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;

use crate::config::VaeConfig;

/// diffusers' VAE GroupNorm/ResNet epsilon.
const EPS: f64 = 1e-6;

struct Encoder {
    conv_in: nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2d,
    quant_conv: Option<nn::Conv2d>,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let c = &cfg.candle;
        let channels = &c.block_out_channels;
        let Some(&last) = channels.last() else {
            candle_core::bail!("block_out_channels is empty");
        };
        let padded = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let enc = vb.pp("encoder");
        let conv_in = nn::conv2d(cfg.in_channels, channels[0], 3, padded, enc.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let input = if i == 0 { channels[0] } else { channels[i - 1] };
            let block_cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: EPS,
                resnet_groups: c.norm_num_groups,
                output_scale_factor: 1.0,
                add_downsample: i + 1 != channels.len(),
                downsample_padding: 0,
            };
            down_blocks.push(DownEncoderBlock2D::new(
                enc.pp("down_blocks").pp(i),
                input,
                out,
                block_cfg,
            )?);
        }
        let mid_cfg = UNetMidBlock2DConfig {
            num_layers: 1,
            resnet_eps: EPS,
            resnet_groups: Some(c.norm_num_groups),
            attn_num_head_channels: None,
            output_scale_factor: 1.0,
        };
        let mid_block = UNetMidBlock2D::new(enc.pp("mid_block"), last, None, mid_cfg)?;
        let conv_norm_out = nn::group_norm(c.norm_num_groups, last, EPS, enc.pp("conv_norm_out"))?;
        let conv_out = nn::conv2d(last, 2 * c.latent_channels, 3, padded, enc.pp("conv_out"))?;
        let quant_conv = if c.use_quant_conv {
            Some(nn::conv2d(
                2 * c.latent_channels,
                2 * c.latent_channels,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
        })
    }

    /// Image `[b, 3, H, W]` in `[-1, 1]` -> posterior parameters `[b, 2 * latent, h, w]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x, None)?;
        let x = nn::ops::silu(&self.conv_norm_out.forward(&x)?)?;
        let x = self.conv_out.forward(&x)?;
        match &self.quant_conv {
            Some(q) => q.forward(&x),
            None => Ok(x),
        }
    }
}

/// The posterior `N(mean, std^2)` of an encoded image, in unscaled latent units.
pub struct Posterior {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// `mean + std * noise`.
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
}

/// Encoder and decoder of one VAE folder.
pub struct Vae {
    encoder: Encoder,
    decoder: AutoEncoderKL,
    pub config: VaeConfig,
}

impl Vae {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let encoder = Encoder::new(vb.clone(), cfg)?;
        let decoder =
            AutoEncoderKL::new(vb, cfg.in_channels, cfg.out_channels, cfg.candle.clone())?;
        Ok(Self {
            encoder,
            decoder,
            config: cfg.clone(),
        })
    }

    /// The posterior of images `[b, 3, H, W]` in `[-1, 1]`.
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Posterior> {
        let params = per_image(x, |x| self.encoder.forward(x))?;
        let latent = self.config.candle.latent_channels;
        let mean = params.narrow(1, 0, latent)?.contiguous()?;
        let logvar = params
            .narrow(1, latent, latent)?
            .contiguous()?
            .clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Posterior { mean, std })
    }

    /// Unscaled latents `[b, latent, h, w]` -> images `[b, 3, H, W]` (about `[-1, 1]`).
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        per_image(z, |z| self.decoder.decode(z))
    }
}

/// Runs `f` on each image of a batch separately and stacks the results. candle's VAE
/// attention block (`AttentionBlock`, one head) mixes the images of a batch of more than one
/// (candle-transformers 0.11.1), so the VAE only ever sees batches of one.
fn per_image(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    if n == 1 {
        return f(x);
    }
    let parts = (0..n)
        .map(|i| f(&x.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}
