//! Differentiable layers built only from candle primitives that have a backward pass.
//!
//! candle 0.11's fused kernels (`candle_nn::ops::softmax_last_dim`, `layer_norm`, and the
//! `LayerNorm` module that calls it) are applied with `apply_op*_no_bwd`: the autograd graph
//! silently stops there. Everything here is composed of element-wise ops, reductions,
//! matmul, conv2d and nearest upsampling, all of which candle differentiates.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use candle_core::{Tensor, Var, D};

/// The trainable tensors of a model, by their diffusers name.
///
/// Layers take their weights with [`Params::get`], which checks the shape and records the
/// name; [`Params::unused`] then lists tensors of the file that no layer took (an
/// architecture mismatch, since every tensor must be trained).
pub struct Params {
    vars: BTreeMap<String, Var>,
    used: Mutex<BTreeSet<String>>,
}

impl Params {
    /// Wraps tensors (any float dtype) as `f32` variables.
    pub fn new(tensors: impl IntoIterator<Item = (String, Tensor)>) -> candle_core::Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, t) in tensors {
            let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
            // `Var::from_tensor` on a fresh tensor gives a new variable with its own storage.
            vars.insert(name, Var::from_tensor(&t.copy()?)?);
        }
        Ok(Self {
            vars,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The variable `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let Some(v) = self.vars.get(name) else {
            candle_core::bail!("missing tensor `{name}` (expected shape {shape:?})");
        };
        if v.dims() != shape {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                v.dims()
            );
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
        Ok(v.as_tensor().clone())
    }

    /// Names of tensors no layer has taken.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        self.vars
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// All variables, in name order.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Copies of the current values (own storage, detached), in name order.
    pub fn snapshot(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_detached_tensor().copy()?)))
            .collect()
    }
}

/// A name prefix, like candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Path<'a> {
    params: &'a Params,
    prefix: String,
}

impl<'a> Path<'a> {
    pub fn root(params: &'a Params) -> Self {
        Self {
            params,
            prefix: String::new(),
        }
    }

    pub fn pp(&self, s: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        };
        Self {
            params: self.params,
            prefix,
        }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        self.params.get(&self.pp(name).prefix, shape)
    }
}

/// `y = x W^T + b` over the last dimension.
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &Path, input: usize, output: usize, bias: bool) -> candle_core::Result<Self> {
        Ok(Self {
            w: p.get("weight", &[output, input])?,
            b: if bias {
                Some(p.get("bias", &[output])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&input, lead)) = dims.split_last() else {
            candle_core::bail!("linear on a scalar");
        };
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, input))?.matmul(&self.w.t()?)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.w.dim(0)?);
        y.reshape(out)
    }
}

/// A 2D convolution with bias (`[out, in, k, k]` kernel).
pub struct Conv2d {
    w: Tensor,
    b: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        p: &Path,
        input: usize,
        output: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            w: p.get("weight", &[output, input, k, k])?,
            b: p.get("bias", &[output])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv2d(&self.w, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.b.reshape((1, self.b.dim(0)?, 1, 1))?)
    }
}

/// GroupNorm over `[b, c, ...]` with a per-channel affine transform.
pub struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(p: &Path, groups: usize, channels: usize, eps: f64) -> candle_core::Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("{channels} channels are not divisible into {groups} groups");
        }
        Ok(Self {
            w: p.get("weight", &[channels])?,
            b: p.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 {
            candle_core::bail!("group norm needs [b, c, ...], got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        let per_group = x.elem_count() / (b * self.groups);
        let g = x.reshape((b, self.groups, per_group))?;
        let g = normalize_last(&g, self.eps)?.reshape(dims.as_slice())?;
        let mut shape = vec![1; dims.len()];
        shape[1] = c;
        g.broadcast_mul(&self.w.reshape(shape.as_slice())?)?
            .broadcast_add(&self.b.reshape(shape.as_slice())?)
    }
}

/// LayerNorm over the last dimension, with weight and bias.
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            w: p.get("weight", &[dim])?,
            b: p.get("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        normalize_last(x, self.eps)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance, like PyTorch).
fn normalize_last(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Softmax over the last dimension from `exp` and `sum` (the max is subtracted for
/// stability and detached: softmax does not depend on it).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_matches_candle_and_has_gradients() -> candle_core::Result<()> {
        let x = Var::from_tensor(&Tensor::new(
            &[[1f32, 2., 3.], [0.5, -1., 4.]],
            &Device::Cpu,
        )?)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let theirs = candle_nn::ops::softmax_last_dim(x.as_tensor())?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let w = Tensor::new(&[[1f32, -2., 0.5], [3., 1., -1.]], &Device::Cpu)?;
        let grads = (ours * w)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
