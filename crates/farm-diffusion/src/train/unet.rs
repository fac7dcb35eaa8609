//! A differentiable `UNet2DConditionModel` (diffusers names, SD 1.x/2.x layouts).
//!
//! The same architecture as candle-transformers' UNet used for inference, written with the
//! layers of [`super::nn`] so that every weight receives a gradient. It reads the same
//! `unet/config.json` (through [`UNetConfig`]) and the same safetensors names, and refuses
//! files with tensors it does not use. Differences from candle's inference UNet: GEGLU uses
//! the exact (erf) GELU as diffusers does, and attention/normalisation are unfused.
use candle_core::{DType, Device, Tensor};

use super::nn::{softmax_last_dim, Conv2d, GroupNorm, LayerNorm, Linear, Params, Path};
use crate::config::UNetConfig;

/// The GroupNorm epsilon diffusers uses in `Transformer2DModel`.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// The LayerNorm epsilon of `BasicTransformerBlock`.
const LAYER_NORM_EPS: f64 = 1e-5;

type CResult<T> = candle_core::Result<T>;

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    fn new(p: &Path, cfg: &UNetConfig, input: usize, output: usize, scale: f64) -> CResult<Self> {
        let c = &cfg.candle;
        let temb = time_embed_dim(cfg);
        Ok(Self {
            norm1: GroupNorm::new(&p.pp("norm1"), c.norm_num_groups, input, c.norm_eps)?,
            conv1: Conv2d::new(&p.pp("conv1"), input, output, 3, 1, 1)?,
            time_emb_proj: Linear::new(&p.pp("time_emb_proj"), temb, output, true)?,
            norm2: GroupNorm::new(&p.pp("norm2"), c.norm_num_groups, output, c.norm_eps)?,
            conv2: Conv2d::new(&p.pp("conv2"), output, output, 3, 1, 1)?,
            shortcut: if input != output {
                Some(Conv2d::new(&p.pp("conv_shortcut"), input, output, 1, 1, 0)?)
            } else {
                None
            },
            output_scale: scale,
        })
    }

    /// `temb` is already `silu(time embedding)`.
    fn forward(&self, x: &Tensor, temb: &Tensor) -> CResult<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let t = self
            .time_emb_proj
            .forward(temb)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(p: &Path, dim: usize, context: usize, heads: usize) -> CResult<Self> {
        Ok(Self {
            to_q: Linear::new(&p.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(&p.pp("to_k"), context, dim, false)?,
            to_v: Linear::new(&p.pp("to_v"), context, dim, false)?,
            to_out: Linear::new(&p.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    /// `[b, n, h*d]` -> `[b, h, n, d]`.
    fn split(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, n, inner) = x.dims3()?;
        x.reshape((b, n, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> CResult<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, n, inner) = x.dims3()?;
        let q = self.split(&self.to_q.forward(x)?)?;
        let k = self.split(&self.to_k.forward(ctx)?)?;
        let v = self.split(&self.to_v.forward(ctx)?)?;
        let scale = 1.0 / ((inner / self.heads) as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let out = softmax_last_dim(&scores)?.matmul(&v)?;
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, n, inner))?;
        self.to_out.forward(&out)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(p: &Path, dim: usize, context: usize, heads: usize) -> CResult<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(&p.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::new(&p.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&p.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::new(&p.pp("attn2"), dim, context, heads)?,
            norm3: LayerNorm::new(&p.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff_in: Linear::new(&p.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::new(&p.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        // GEGLU with the exact GELU, as diffusers.
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let inner = h.dim(candle_core::D::Minus1)? / 2;
        let hidden = h.narrow(candle_core::D::Minus1, 0, inner)?;
        let gate = h.narrow(candle_core::D::Minus1, inner, inner)?;
        let h = (hidden * gate.gelu_erf()?)?;
        self.ff_out.forward(&h)? + x
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` (continuous input).
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(
        p: &Path,
        cfg: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
    ) -> CResult<Self> {
        let c = &cfg.candle;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(Linear::new(&p.pp("proj_in"), channels, channels, true)?),
                Proj::Linear(Linear::new(&p.pp("proj_out"), channels, channels, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::new(&p.pp("proj_in"), channels, channels, 1, 1, 0)?),
                Proj::Conv(Conv2d::new(&p.pp("proj_out"), channels, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..layers)
            .map(|i| {
                TransformerBlock::new(
                    &p.pp("transformer_blocks").pp(i),
                    channels,
                    c.cross_attention_dim,
                    heads,
                )
            })
            .collect::<CResult<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(
                &p.pp("norm"),
                c.norm_num_groups,
                channels,
                TRANSFORMER_NORM_EPS,
            )?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_seq = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut s = match &self.proj_in {
            Proj::Conv(conv) => to_seq(&conv.forward(&n)?)?,
            Proj::Linear(l) => l.forward(&to_seq(&n)?)?,
        };
        for block in &self.blocks {
            s = block.forward(&s, context)?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_map(&s)?)?,
            Proj::Linear(l) => to_map(&l.forward(&s)?)?,
        };
        out + x
    }
}

/// One resnet of a block and, in cross-attention blocks, the transformer after it.
struct Layer {
    resnet: ResnetBlock,
    attention: Option<Transformer2D>,
}

struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Conv2d>,
}

struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Conv2d>,
}

/// The trainable UNet.
pub struct TrainUNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid_resnet0: ResnetBlock,
    mid_layers: Vec<Layer>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: UNetConfig,
}

fn time_embed_dim(cfg: &UNetConfig) -> usize {
    cfg.candle.blocks.first().map_or(0, |b| b.out_channels) * 4
}

impl TrainUNet {
    /// Builds the UNet from `params` (diffusers names). Fails on a missing tensor, a tensor
    /// of the wrong shape, or a tensor the architecture does not use.
    pub fn new(params: &Params, cfg: &UNetConfig) -> CResult<Self> {
        let c = &cfg.candle;
        let root = Path::root(params);
        let channels: Vec<usize> = c.blocks.iter().map(|b| b.out_channels).collect();
        let Some(&first) = channels.first() else {
            candle_core::bail!("the UNet has no blocks");
        };
        let n = channels.len();
        if n > 1 && c.downsample_padding != 1 {
            // diffusers pads asymmetrically when downsample_padding is 0.
            candle_core::bail!(
                "downsample_padding {} is not supported for training (only 1)",
                c.downsample_padding
            );
        }
        let temb = time_embed_dim(cfg);
        let conv_in = Conv2d::new(&root.pp("conv_in"), cfg.in_channels, first, 3, 1, 1)?;
        let time_linear_1 = Linear::new(&root.pp("time_embedding.linear_1"), first, temb, true)?;
        let time_linear_2 = Linear::new(&root.pp("time_embedding.linear_2"), temb, temb, true)?;

        let mut down = Vec::with_capacity(n);
        let mut input = first;
        for (i, block) in c.blocks.iter().enumerate() {
            let p = root.pp("down_blocks").pp(i);
            let out = block.out_channels;
            let mut layers = Vec::new();
            for j in 0..c.layers_per_block {
                let inp = if j == 0 { input } else { out };
                let resnet = ResnetBlock::new(&p.pp("resnets").pp(j), cfg, inp, out, 1.0)?;
                let attention = match block.use_cross_attn {
                    Some(t) => Some(Transformer2D::new(
                        &p.pp("attentions").pp(j),
                        cfg,
                        out,
                        block.attention_head_dim,
                        t,
                    )?),
                    None => None,
                };
                layers.push(Layer { resnet, attention });
            }
            let downsample = if i + 1 < n {
                Some(Conv2d::new(
                    &p.pp("downsamplers.0.conv"),
                    out,
                    out,
                    3,
                    2,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock { layers, downsample });
            input = out;
        }

        let last = channels[n - 1];
        let last_block = &c.blocks[n - 1];
        let mid = root.pp("mid_block");
        let scale = c.mid_block_scale_factor;
        let mid_resnet0 = ResnetBlock::new(&mid.pp("resnets.0"), cfg, last, last, scale)?;
        let mid_layers = vec![Layer {
            attention: Some(Transformer2D::new(
                &mid.pp("attentions.0"),
                cfg,
                last,
                last_block.attention_head_dim,
                last_block.use_cross_attn.unwrap_or(1),
            )?),
            resnet: ResnetBlock::new(&mid.pp("resnets.1"), cfg, last, last, scale)?,
        }];

        let mut up = Vec::with_capacity(n);
        let mut prev = last;
        for i in 0..n {
            let rev = n - 1 - i;
            let block = &c.blocks[rev];
            let out = channels[rev];
            let skip_in = channels[rev.saturating_sub(1)];
            let p = root.pp("up_blocks").pp(i);
            let mut layers = Vec::new();
            for j in 0..=c.layers_per_block {
                let skip = if j == c.layers_per_block {
                    skip_in
                } else {
                    out
                };
                let inp = if j == 0 { prev } else { out };
                let resnet = ResnetBlock::new(&p.pp("resnets").pp(j), cfg, inp + skip, out, 1.0)?;
                let attention = match block.use_cross_attn {
                    Some(t) => Some(Transformer2D::new(
                        &p.pp("attentions").pp(j),
                        cfg,
                        out,
                        block.attention_head_dim,
                        t,
                    )?),
                    None => None,
                };
                layers.push(Layer { resnet, attention });
            }
            let upsample = if i + 1 < n {
                Some(Conv2d::new(&p.pp("upsamplers.0.conv"), out, out, 3, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock { layers, upsample });
            prev = out;
        }
        let conv_norm_out = GroupNorm::new(
            &root.pp("conv_norm_out"),
            c.norm_num_groups,
            first,
            c.norm_eps,
        )?;
        let conv_out = Conv2d::new(&root.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?;
        let unused = params.unused();
        if !unused.is_empty() {
            candle_core::bail!(
                "{} tensor(s) not used by the architecture in unet/config.json, e.g. `{}`",
                unused.len(),
                unused[0]
            );
        }
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid_resnet0,
            mid_layers,
            up,
            conv_norm_out,
            conv_out,
            cfg: cfg.clone(),
        })
    }

    /// How many times the UNet halves the latent size: latent sides must be multiples of
    /// `2^downsamples()`.
    pub fn downsamples(&self) -> usize {
        self.down.len().saturating_sub(1)
    }

    /// diffusers' sinusoidal timestep features `[b, block_out_channels[0]]`, computed in
    /// `f32` on the CPU as diffusers' `get_timestep_embedding`.
    fn timestep_features(&self, timesteps: &[u32], device: &Device) -> CResult<Tensor> {
        let dim = self.cfg.candle.blocks[0].out_channels;
        let half = dim / 2;
        let shift = self.cfg.candle.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - shift)).exp())
            .collect();
        let mut values = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            let (a, b) = if self.cfg.candle.flip_sin_to_cos {
                (cos, sin)
            } else {
                (sin, cos)
            };
            values.extend(a);
            values.extend(b);
            if dim % 2 == 1 {
                values.push(0.0);
            }
        }
        Tensor::from_vec(values, (timesteps.len(), dim), &Device::Cpu)?
            .to_device(device)?
            .to_dtype(DType::F32)
    }

    /// Predicts noise (or velocity) for `sample` `[b, c, h, w]` at `timesteps` (one per
    /// image) with text embeddings `context` `[b, 77, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &[u32], context: &Tensor) -> CResult<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timesteps.len());
        }
        let m = 1usize << self.downsamples();
        if h % m != 0 || w % m != 0 {
            candle_core::bail!("latent size {h}x{w} is not a multiple of {m}");
        }
        let sample = if self.cfg.candle.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let t = self.timestep_features(timesteps, sample.device())?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t)?.silu()?)?;
        let temb = temb.silu()?; // every resnet applies SiLU before its projection

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for layer in &block.layers {
                x = layer.resnet.forward(&x, &temb)?;
                if let Some(a) = &layer.attention {
                    x = a.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnet0.forward(&x, &temb)?;
        for layer in &self.mid_layers {
            if let Some(a) = &layer.attention {
                x = a.forward(&x, context)?;
            }
            x = layer.resnet.forward(&x, &temb)?;
        }
        for block in &self.up {
            for layer in &block.layers {
                let Some(skip) = skips.pop() else {
                    candle_core::bail!("UNet skip connections exhausted");
                };
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = layer.resnet.forward(&x, &temb)?;
                if let Some(a) = &layer.attention {
                    x = a.forward(&x, context)?;
                }
            }
            if let Some(u) = &block.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let x = self.conv_norm_out.forward(&x)?.silu()?;
        self.conv_out.forward(&x)
    }
}
