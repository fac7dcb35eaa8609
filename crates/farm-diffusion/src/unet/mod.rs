//! The UNet used for inference: [`UNet`] is either candle-transformers'
//! `UNet2DConditionModel` or [`CpuUNet`], this crate's own f32 CPU implementation of the
//! same network (diffusers' `UNet2DConditionModel` of SD 1.x/2.x), which reads the same
//! weights and is about twice as fast on the CPU.
//!
//! [`CpuUNet`] keeps activations channels-last and runs on the kernels of `kernels`: 3×3
//! convolutions as tiled im2col + gemm with the bias, time embedding and residual added by
//! the product itself, group norm with SiLU fused, attention computed per block of query rows
//! (the `[heads, 4096, 4096]` score matrix of the 64×64 layers is never stored), GEGLU with
//! the exact erf GELU as diffusers (candle's uses the tanh approximation). It serves the CPU
//! in f32; other devices and dtypes use candle's model ([`UNetEngine::Auto`]).
mod kernels;
mod sgemm;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModel};

use crate::config::UNetConfig;
use crate::{DiffusionError, Result};
use kernels::{attention, geglu, Conv, GroupNorm, LayerNorm, Linear, Map, Weight};

/// Which implementation [`UNet::new`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UNetEngine {
    /// [`CpuUNet`] on the CPU in f32, candle's model otherwise.
    #[default]
    Auto,
    /// candle-transformers' `UNet2DConditionModel` (every device and dtype).
    Candle,
    /// [`CpuUNet`] (CPU, f32 only).
    Cpu,
}

impl UNetEngine {
    pub fn name(&self) -> &'static str {
        match self {
            UNetEngine::Auto => "auto",
            UNetEngine::Candle => "candle",
            UNetEngine::Cpu => "cpu",
        }
    }
}

impl std::str::FromStr for UNetEngine {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        [UNetEngine::Auto, UNetEngine::Candle, UNetEngine::Cpu]
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                DiffusionError::InvalidInput(format!(
                    "unknown UNet engine {s:?}; expected auto, candle or cpu"
                ))
            })
    }
}

/// The denoising UNet.
#[derive(Debug)]
pub enum UNet {
    Candle(Box<UNet2DConditionModel>),
    Cpu(Box<CpuUNet>),
}

impl UNet {
    /// Builds the UNet of `config` from `vb` (diffusers' parameter names) on `vb`'s device
    /// and dtype.
    pub fn new(
        vb: VarBuilder,
        config: &UNetConfig,
        engine: UNetEngine,
    ) -> candle_core::Result<Self> {
        let cpu_f32 = vb.device().is_cpu() && vb.dtype() == DType::F32;
        let engine = match engine {
            UNetEngine::Auto if cpu_f32 => UNetEngine::Cpu,
            UNetEngine::Auto => UNetEngine::Candle,
            UNetEngine::Cpu if !cpu_f32 => candle_core::bail!(
                "the cpu UNet engine runs on the CPU in f32 only, not {:?} {:?}",
                vb.device(),
                vb.dtype()
            ),
            e => e,
        };
        Ok(match engine {
            UNetEngine::Cpu => UNet::Cpu(Box::new(CpuUNet::new(vb, config)?)),
            _ => UNet::Candle(Box::new(UNet2DConditionModel::new(
                vb,
                config.in_channels,
                config.out_channels,
                false,
                config.candle.clone(),
            )?)),
        })
    }

    /// The engine that was built.
    pub fn engine(&self) -> UNetEngine {
        match self {
            UNet::Candle(_) => UNetEngine::Candle,
            UNet::Cpu(_) => UNetEngine::Cpu,
        }
    }

    /// The noise prediction for latents `xs` `[b, c, h, w]` at `timestep`, conditioned on
    /// `context` `[b, tokens, cross_attention_dim]`.
    pub fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        match self {
            UNet::Candle(m) => Ok(m.forward(xs, timestep, context)?),
            UNet::Cpu(m) => m.forward(xs, timestep, context),
        }
    }
}

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// `[out, inp]` weights (several stacked along `out`) and an optional bias.
fn linear_from(ws: &[Tensor], bias: Option<Tensor>) -> candle_core::Result<Linear> {
    let w = Tensor::cat(ws, 0)?;
    let (out, inp) = w.dims2()?;
    Ok(Linear {
        inp,
        out,
        w: Weight::new(to_vec(&w.t()?.contiguous()?)?, inp, out),
        bias: bias.map(|b| to_vec(&b)).transpose()?,
    })
}

fn weight(vb: &VarBuilder, inp: usize, out: usize) -> candle_core::Result<Tensor> {
    vb.get_with_hints(
        (out, inp),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )
}

fn bias(vb: &VarBuilder, fan_in: usize, out: usize) -> candle_core::Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    vb.get_with_hints(
        out,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    linear_from(&[weight(&vb, inp, out)?], Some(bias(&vb, inp, out)?))
}

/// Bias-free linears with the same input, fused into one product (e.g. `to_q`, `to_k`,
/// `to_v`).
fn linears_fused(vbs: &[VarBuilder], inp: usize, out: usize) -> candle_core::Result<Linear> {
    let ws = vbs
        .iter()
        .map(|vb| weight(vb, inp, out))
        .collect::<candle_core::Result<Vec<_>>>()?;
    linear_from(&ws, None)
}

/// A 1×1 convolution (or, with `linear`, a linear layer) as a [`Linear`].
fn projection(vb: VarBuilder, inp: usize, out: usize, linear: bool) -> candle_core::Result<Linear> {
    let w = if linear {
        weight(&vb, inp, out)?
    } else {
        vb.get_with_hints(
            (out, inp, 1, 1),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?
        .reshape((out, inp))?
    };
    linear_from(&[w], Some(bias(&vb, inp, out)?))
}

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: (usize, usize),
) -> candle_core::Result<Conv> {
    let w = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    Ok(Conv {
        cin,
        cout,
        k,
        stride,
        pad,
        w: Weight::new(
            to_vec(&w.permute((2, 3, 1, 0))?.contiguous()?)?,
            k * k * cin,
            cout,
        ),
        bias: to_vec(&bias(&vb, cin, cout)?)?,
    })
}

fn group_norm(vb: VarBuilder, groups: usize, c: usize, eps: f64) -> candle_core::Result<GroupNorm> {
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group norm: {c} channels are not divisible into {groups} groups");
    }
    Ok(GroupNorm {
        groups,
        eps,
        gamma: to_vec(&vb.get_with_hints(c, "weight", Init::Const(1.0))?)?,
        beta: to_vec(&vb.get_with_hints(c, "bias", Init::Const(0.0))?)?,
    })
}

fn layer_norm(vb: VarBuilder, c: usize) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        eps: 1e-5,
        gamma: to_vec(&vb.get_with_hints(c, "weight", Init::Const(1.0))?)?,
        beta: to_vec(&vb.get_with_hints(c, "bias", Init::Const(0.0))?)?,
    })
}

/// diffusers' `ResnetBlock2D` with a time embedding.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    output_scale_factor: f64,
}

impl Resnet {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        config: &UNetConfig,
        output_scale_factor: f64,
    ) -> candle_core::Result<Self> {
        let (g, eps) = (config.candle.norm_num_groups, config.candle.norm_eps);
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), g, cin, eps)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, (1, 1))?,
            time_emb_proj: linear(vb.pp("time_emb_proj"), temb, cout)?,
            norm2: group_norm(vb.pp("norm2"), g, cout, eps)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, (1, 1))?,
            shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, (0, 0))?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `temb`: `silu(time embedding)`, `[b, temb_channels]`.
    fn forward(&self, x: &Map, temb: &[f32]) -> Map {
        let t = self
            .time_emb_proj
            .forward(temb, x.b, self.time_emb_proj.inp);
        let h = self.norm1.forward(x, true);
        let h = self.conv1.forward(&h, Some(&t));
        let h = self.norm2.forward(&h, true);
        let mut out = match &self.shortcut {
            Some(sc) => sc.forward(x, None),
            None => x.clone(),
        };
        out.add_row(&self.conv2.bias);
        self.conv2.accumulate(&h, &mut out);
        if self.output_scale_factor != 1.0 {
            out.scale((1.0 / self.output_scale_factor) as f32);
        }
        out
    }
}

/// Rows per block of the transformer feed-forward.
const FF_ROWS: usize = 1024;

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
struct TransformerBlock {
    norm1: LayerNorm,
    qkv: Linear,
    out1: Linear,
    norm2: LayerNorm,
    q2: Linear,
    kv2: Linear,
    out2: Linear,
    norm3: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    heads: usize,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> candle_core::Result<Self> {
        let a1 = vb.pp("attn1");
        let a2 = vb.pp("attn2");
        let ff = vb.pp("ff").pp("net");
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), dim)?,
            qkv: linears_fused(&[a1.pp("to_q"), a1.pp("to_k"), a1.pp("to_v")], dim, dim)?,
            out1: linear(a1.pp("to_out.0"), dim, dim)?,
            norm2: layer_norm(vb.pp("norm2"), dim)?,
            q2: linears_fused(&[a2.pp("to_q")], dim, dim)?,
            kv2: linears_fused(&[a2.pp("to_k"), a2.pp("to_v")], context_dim, dim)?,
            out2: linear(a2.pp("to_out.0"), dim, dim)?,
            norm3: layer_norm(vb.pp("norm3"), dim)?,
            ff1: linear(ff.pp("0").pp("proj"), dim, dim * 8)?,
            ff2: linear(ff.pp("2"), dim * 4, dim)?,
            heads,
        })
    }

    /// `x`: the token rows `[b, h, w, dim]`, updated in place; `ctx`: `[b·tokens, ctx_dim]`.
    fn forward(&self, x: &mut Map, ctx: &[f32], tokens: usize) {
        let (rows, dim, b, hw) = (x.b * x.hw(), x.c, x.b, x.hw());
        let d = dim / self.heads;
        let scale = 1.0 / (d as f32).sqrt();

        let n = self.norm1.forward(&x.data);
        let qkv = self.qkv.forward(&n, rows, dim);
        drop(n);
        let ld = 3 * dim;
        let a = attention(
            (&qkv, ld),
            (&qkv[dim..], ld),
            (&qkv[2 * dim..], ld),
            b,
            hw,
            hw,
            self.heads,
            d,
            scale,
        );
        drop(qkv);
        self.out1.accumulate(&a, rows, &mut x.data);
        drop(a);

        let n = self.norm2.forward(&x.data);
        let q = self.q2.forward(&n, rows, dim);
        drop(n);
        let kv = self.kv2.forward(ctx, b * tokens, self.kv2.inp);
        let a = attention(
            (&q, dim),
            (&kv, 2 * dim),
            (&kv[dim..], 2 * dim),
            b,
            hw,
            tokens,
            self.heads,
            d,
            scale,
        );
        drop(q);
        self.out2.accumulate(&a, rows, &mut x.data);
        drop(a);

        // The feed-forward in blocks of rows: its 8·dim-wide hidden layer stays in cache
        // instead of taking 84 MiB at 64×64.
        let n = self.norm3.forward(&x.data);
        for (n, x) in n
            .chunks(FF_ROWS * dim)
            .zip(x.data.chunks_mut(FF_ROWS * dim))
        {
            let r = n.len() / dim;
            let p = self.ff1.forward(n, r, dim);
            let g = geglu(&p, 4 * dim);
            drop(p);
            self.ff2.accumulate(&g, r, x);
        }
    }
}

/// diffusers' `Transformer2DModel` (candle: `SpatialTransformer`).
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        config: &UNetConfig,
    ) -> candle_core::Result<Self> {
        let c = &config.candle;
        let linear = c.use_linear_projection;
        let tb = vb.pp("transformer_blocks");
        Ok(Self {
            norm: group_norm(vb.pp("norm"), c.norm_num_groups, channels, 1e-6)?,
            proj_in: projection(vb.pp("proj_in"), channels, channels, linear)?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        tb.pp(i.to_string()),
                        channels,
                        heads,
                        c.cross_attention_dim,
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            proj_out: projection(vb.pp("proj_out"), channels, channels, linear)?,
        })
    }

    fn forward(&self, x: Map, ctx: &[f32], tokens: usize) -> Map {
        let rows = x.b * x.hw();
        let n = self.norm.forward(&x, false);
        let mut h = Map {
            data: self.proj_in.forward(&n.data, rows, x.c),
            ..n
        };
        for block in &self.blocks {
            block.forward(&mut h, ctx, tokens);
        }
        let mut out = x;
        self.proj_out.accumulate(&h.data, rows, &mut out.data);
        out
    }
}

/// A down or up block: resnets, each followed by a transformer in the cross-attention
/// variants, and a down/up-sampling convolution.
struct Block {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    sampler: Option<Conv>,
}

/// [`UNet`]'s own CPU implementation; see the module docs.
pub struct CpuUNet {
    in_channels: usize,
    out_channels: usize,
    cross_attention_dim: usize,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    time_channels: usize,
    conv_in: Conv,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<Block>,
    mid_resnet: Resnet,
    mid: Vec<(SpatialTransformer, Resnet)>,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl std::fmt::Debug for CpuUNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuUNet")
            .field("in_channels", &self.in_channels)
            .field("out_channels", &self.out_channels)
            .field("channels", &self.time_channels)
            .field("blocks", &self.down.len())
            .finish_non_exhaustive()
    }
}

impl CpuUNet {
    /// Builds the network of `config` from `vb` (diffusers' parameter names; any dtype, the
    /// weights are converted to f32).
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> candle_core::Result<Self> {
        let c = &config.candle;
        let n = c.blocks.len();
        let (Some(first), Some(last)) = (c.blocks.first(), c.blocks.last()) else {
            candle_core::bail!("the UNet config has no blocks");
        };
        let ch0 = first.out_channels;
        let temb = 4 * ch0;
        let cross = |vb: VarBuilder, channels: usize, heads: usize, depth: usize| {
            if heads == 0 || !channels.is_multiple_of(heads) {
                candle_core::bail!("{channels} channels are not divisible by {heads} heads");
            }
            SpatialTransformer::new(vb, channels, heads, depth, config)
        };
        // A block's transformers, one after each of its `layers` resnets (none for a block
        // without cross-attention).
        let transformers =
            |vb: VarBuilder, block: &BlockConfig, layers: usize, channels: usize| match block
                .use_cross_attn
            {
                Some(depth) => (0..layers)
                    .map(|j| {
                        cross(
                            vb.pp(j.to_string()),
                            channels,
                            block.attention_head_dim,
                            depth,
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>(),
                None => Ok(Vec::new()),
            };

        let vb_down = vb.pp("down_blocks");
        let mut down = Vec::with_capacity(n);
        for (i, block) in c.blocks.iter().enumerate() {
            let vb = vb_down.pp(i.to_string());
            let cin = if i == 0 {
                ch0
            } else {
                c.blocks[i - 1].out_channels
            };
            let cout = block.out_channels;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let inp = if j == 0 { cin } else { cout };
                    Resnet::new(
                        vb.pp("resnets").pp(j.to_string()),
                        inp,
                        cout,
                        temb,
                        config,
                        1.0,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = transformers(vb.pp("attentions"), block, c.layers_per_block, cout)?;
            let pad = match c.downsample_padding {
                0 => (0, 1),
                p => (p, p),
            };
            let sampler = if i + 1 < n {
                Some(conv(
                    vb.pp("downsamplers").pp("0").pp("conv"),
                    cout,
                    cout,
                    3,
                    2,
                    pad,
                )?)
            } else {
                None
            };
            down.push(Block {
                resnets,
                attentions,
                sampler,
            });
        }

        let vb_mid = vb.pp("mid_block");
        let ch_last = last.out_channels;
        let msf = c.mid_block_scale_factor;
        let mid_resnet = Resnet::new(
            vb_mid.pp("resnets").pp("0"),
            ch_last,
            ch_last,
            temb,
            config,
            msf,
        )?;
        let mid = vec![(
            cross(
                vb_mid.pp("attentions").pp("0"),
                ch_last,
                last.attention_head_dim,
                last.use_cross_attn.unwrap_or(1),
            )?,
            Resnet::new(
                vb_mid.pp("resnets").pp("1"),
                ch_last,
                ch_last,
                temb,
                config,
                msf,
            )?,
        )];

        let vb_up = vb.pp("up_blocks");
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb_up.pp(i.to_string());
            let block = c.blocks[n - 1 - i];
            let cout = block.out_channels;
            let prev = if i > 0 {
                c.blocks[n - i].out_channels
            } else {
                ch_last
            };
            let skip_last = c.blocks[if i == n - 1 { 0 } else { n - i - 2 }].out_channels;
            let layers = c.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { skip_last } else { cout };
                    let inp = if j == 0 { prev } else { cout };
                    Resnet::new(
                        vb.pp("resnets").pp(j.to_string()),
                        inp + skip,
                        cout,
                        temb,
                        config,
                        1.0,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = transformers(vb.pp("attentions"), &block, layers, cout)?;
            let sampler = if i + 1 < n {
                Some(conv(
                    vb.pp("upsamplers").pp("0").pp("conv"),
                    cout,
                    cout,
                    3,
                    1,
                    (1, 1),
                )?)
            } else {
                None
            };
            up.push(Block {
                resnets,
                attentions,
                sampler,
            });
        }

        Ok(Self {
            in_channels: config.in_channels,
            out_channels: config.out_channels,
            cross_attention_dim: c.cross_attention_dim,
            center_input_sample: c.center_input_sample,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            time_channels: ch0,
            conv_in: conv(vb.pp("conv_in"), config.in_channels, ch0, 3, 1, (1, 1))?,
            time_linear_1: linear(vb.pp("time_embedding").pp("linear_1"), ch0, temb)?,
            time_linear_2: linear(vb.pp("time_embedding").pp("linear_2"), temb, temb)?,
            down,
            mid_resnet,
            mid,
            up,
            norm_out: group_norm(vb.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?,
            conv_out: conv(vb.pp("conv_out"), ch0, config.out_channels, 3, 1, (1, 1))?,
        })
    }

    /// `silu(time_embedding(timestep))` for each of `b` images, `[b, 4·channels]`.
    fn time_embedding(&self, timestep: f64, b: usize) -> Vec<f32> {
        let half = self.time_channels / 2;
        let t = timestep as f32;
        let mut proj = Vec::with_capacity(b * self.time_channels);
        for _ in 0..b {
            let args: Vec<f32> = (0..half)
                .map(|i| {
                    let e = i as f32 * -(10_000f64.ln() as f32)
                        / (half as f32 - self.freq_shift as f32);
                    t * e.exp()
                })
                .collect();
            let (cos, sin) = (args.iter().map(|a| a.cos()), args.iter().map(|a| a.sin()));
            if self.flip_sin_to_cos {
                proj.extend(cos.chain(sin));
            } else {
                proj.extend(sin.chain(cos));
            }
            proj.resize(proj.len() + self.time_channels % 2, 0.0);
        }
        let silu = |v: &mut [f32]| v.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp());
        let mut h = self.time_linear_1.forward(&proj, b, self.time_channels);
        silu(&mut h);
        let mut emb = self.time_linear_2.forward(&h, b, self.time_linear_2.inp);
        silu(&mut emb);
        emb
    }

    /// See [`UNet::forward`].
    pub fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let (cb, tokens, cd) = context.dims3()?;
        if c != self.in_channels || cb != b || cd != self.cross_attention_dim || h == 0 || w == 0 {
            return Err(DiffusionError::InvalidInput(format!(
                "UNet inputs {:?} and context {:?}: expected [b, {}, h, w] and [b, tokens, {}]",
                xs.dims(),
                context.dims(),
                self.in_channels,
                self.cross_attention_dim
            )));
        }
        let device = xs.device().clone();
        let dtype = xs.dtype();
        let mut x = xs.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if self.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let x = Map {
            b,
            h,
            w,
            c,
            data: to_vec(&x.permute((0, 2, 3, 1))?.contiguous()?)?,
        };
        let ctx = to_vec(&context.to_device(&Device::Cpu)?.contiguous()?)?;
        let temb = self.time_embedding(timestep, b);

        let mut x = self.conv_in.forward(&x, None);
        let mut states = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, &temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, &ctx, tokens);
                }
                states.push(x.clone());
            }
            if let Some(conv) = &block.sampler {
                x = conv.forward(&x, None);
                states.push(x.clone());
            }
        }
        x = self.mid_resnet.forward(&x, &temb);
        for (attn, resnet) in &self.mid {
            x = attn.forward(x, &ctx, tokens);
            x = resnet.forward(&x, &temb);
        }
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = states.pop().ok_or_else(|| {
                    DiffusionError::InvalidInput("UNet: fewer skip connections than resnets".into())
                })?;
                x = resnet.forward(&x.cat_channels(&skip), &temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, &ctx, tokens);
                }
            }
            if let Some(conv) = &block.sampler {
                // To the size of the next skip connection: twice the size unless a side was
                // odd on the way down.
                let (oh, ow) = states.last().map_or((2 * x.h, 2 * x.w), |s| (s.h, s.w));
                x = conv.forward(&x.resize_nearest(oh, ow), None);
            }
        }
        let x = self
            .conv_out
            .forward(&self.norm_out.forward(&x, true), None);
        let out = Tensor::from_vec(x.data, (b, x.h, x.w, self.out_channels), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(out.to_dtype(dtype)?.to_device(&device)?)
    }
}
