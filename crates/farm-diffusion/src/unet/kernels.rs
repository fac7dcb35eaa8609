//! f32 CPU kernels of the inference UNet.
//!
//! Activations are [`Map`]s: `[batch, height, width, channels]` row-major (NHWC), i.e. a
//! matrix with one row per pixel. In that layout 1×1 convolutions and linear layers are one
//! matrix product, a 3×3 convolution is a product with a tile of patches (im2col built from
//! contiguous channel rows), and attention heads are column blocks that need no transposes.
//! Matrix products go to the `gemm` crate (the one candle uses); normalisations, softmax and
//! activations are fused passes, compiled a second time for AVX2 and picked at run time.

use gemm::Parallelism;
use rayon::prelude::*;

/// An activation map `[b, h, w, c]`, channels last.
#[derive(Debug, Clone)]
pub(crate) struct Map {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Map {
    pub fn zeros(b: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            b,
            h,
            w,
            c,
            data: vec![0.0; b * h * w * c],
        }
    }

    /// Pixels (rows) per image.
    pub fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Every row of image `i` set to `row(i)` (`c` values).
    pub fn filled_rows(
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        row: impl Fn(usize) -> Vec<f32>,
    ) -> Self {
        let mut m = Self::zeros(b, h, w, c);
        let per_image = h * w * c;
        if per_image == 0 {
            return m;
        }
        for (i, image) in m.data.chunks_exact_mut(per_image).enumerate() {
            let r = row(i);
            image
                .par_chunks_mut(c * ROWS_PER_TASK)
                .for_each(|rows| rows.chunks_exact_mut(c).for_each(|x| x.copy_from_slice(&r)));
        }
        m
    }

    /// Adds `bias` to every row.
    pub fn add_row(&mut self, bias: &[f32]) {
        let c = self.c;
        self.data
            .par_chunks_mut(c * ROWS_PER_TASK)
            .for_each(|rows| add_rows(rows, bias));
    }

    /// Multiplies every value by `s`.
    pub fn scale(&mut self, s: f32) {
        self.data
            .par_chunks_mut(1 << 14)
            .for_each(|x| x.iter_mut().for_each(|v| *v *= s));
    }

    /// Channel concatenation `[self, other]`.
    pub fn cat_channels(&self, other: &Map) -> Map {
        let (c1, c2) = (self.c, other.c);
        let mut out = Map::zeros(self.b, self.h, self.w, c1 + c2);
        out.data
            .par_chunks_mut((c1 + c2) * ROWS_PER_TASK)
            .zip(self.data.par_chunks(c1 * ROWS_PER_TASK))
            .zip(other.data.par_chunks(c2 * ROWS_PER_TASK))
            .for_each(|((o, a), b)| {
                for ((o, a), b) in o
                    .chunks_exact_mut(c1 + c2)
                    .zip(a.chunks_exact(c1))
                    .zip(b.chunks_exact(c2))
                {
                    o[..c1].copy_from_slice(a);
                    o[c1..].copy_from_slice(b);
                }
            });
        out
    }

    /// Nearest-neighbour resize to `oh × ow` (PyTorch's `nearest`: source = ⌊dst · in/out⌋).
    pub fn resize_nearest(&self, oh: usize, ow: usize) -> Map {
        let (h, w, c) = (self.h, self.w, self.c);
        let mut out = Map::zeros(self.b, oh, ow, c);
        let src_y: Vec<usize> = (0..oh)
            .map(|y| ((y as f64 * h as f64 / oh as f64) as usize).min(h - 1))
            .collect();
        let src_x: Vec<usize> = (0..ow)
            .map(|x| ((x as f64 * w as f64 / ow as f64) as usize).min(w - 1))
            .collect();
        out.data
            .par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, y) = (row / oh, row % oh);
                let src = &self.data[(bi * h + src_y[y]) * w * c..][..w * c];
                for (x, d) in dst.chunks_exact_mut(c).enumerate() {
                    d.copy_from_slice(&src[src_x[x] * c..][..c]);
                }
            });
        out
    }
}

/// Rows handed to one rayon task by the row-wise passes.
const ROWS_PER_TASK: usize = 64;

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A row-major matrix operand: `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with leading dimension `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + a[m×k] · b[k×n]`; `dst` is row-major with leading
/// dimension `ldd`. `threaded`: let gemm use the rayon pool (false inside rayon tasks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    threaded: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.fits(m, k) && b.fits(k, n), "matmul operands too small");
    assert!(
        ldd >= n && (m - 1) * ldd + n <= dst.len(),
        "matmul destination too small"
    );
    // SAFETY: the asserts keep every element gemm reads or writes inside the slices, and
    // `dst` is a unique borrow so it aliases neither operand.
    unsafe { matmul_raw(m, n, k, a, b, dst.as_mut_ptr(), ldd, accumulate, threaded) }
}

/// [`matmul`] into a raw destination.
///
/// # Safety
/// `dst` must be valid for writes at `r * ldd + c` for every `r < m`, `c < n`, nobody else
/// may access those elements meanwhile, and `a`, `b` must hold `m×k` and `k×n` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    threaded: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if super::sgemm::available() {
        let a = super::sgemm::Strided {
            ptr: a.data.as_ptr(),
            rs: a.rs,
            cs: a.cs,
        };
        let b = super::sgemm::Strided {
            ptr: b.data.as_ptr(),
            rs: b.rs,
            cs: b.cs,
        };
        // SAFETY: AVX-512 is available; the operands and destination are as the caller
        // guarantees.
        unsafe { super::sgemm::sgemm(m, n, k, a, b, dst, ldd, accumulate, threaded) };
        return;
    }
    let t = threads();
    let parallelism = if threaded && t > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// A constant `[k, n]` right-hand matrix (weights), packed once for the AVX-512 kernel
/// where it runs.
pub(crate) enum Weight {
    Plain(Vec<f32>),
    #[cfg(target_arch = "x86_64")]
    Packed(super::sgemm::PackedB),
}

impl Weight {
    /// `w`: `[k, n]` row-major.
    pub fn new(w: Vec<f32>, k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight shape");
        #[cfg(target_arch = "x86_64")]
        if super::sgemm::available() {
            let b = super::sgemm::Strided {
                ptr: w.as_ptr(),
                rs: n,
                cs: 1,
            };
            // SAFETY: `w` holds k·n elements.
            return Weight::Packed(unsafe { super::sgemm::PackedB::pack(b, k, n, true) });
        }
        Weight::Plain(w)
    }
}

/// `dst[m×n] (+)= a[m×k] · w`, `dst` row-major with leading dimension `ldd`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_w(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    w: &Weight,
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
) {
    match w {
        Weight::Plain(w) => matmul(m, n, k, a, Mat::rows(w, n), dst, ldd, accumulate, true),
        #[cfg(target_arch = "x86_64")]
        Weight::Packed(w) => {
            if m == 0 || n == 0 {
                return;
            }
            assert!(a.fits(m, k), "matmul operand too small");
            assert!(
                ldd >= n && (m - 1) * ldd + n <= dst.len(),
                "matmul destination too small"
            );
            let a = super::sgemm::Strided {
                ptr: a.data.as_ptr(),
                rs: a.rs,
                cs: a.cs,
            };
            // SAFETY: AVX-512 is available (the weight was packed for it); the asserts keep
            // every access inside `a` and `dst`, which is borrowed mutably.
            unsafe { super::sgemm::sgemm_packed(m, a, w, dst.as_mut_ptr(), ldd, accumulate, true) };
        }
    }
}

/// A linear layer: `w` is `[in, out]` (the transpose of PyTorch's weight).
pub(crate) struct Linear {
    pub inp: usize,
    pub out: usize,
    pub w: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `x[rows, inp] (row stride ldx) · w + bias`, a new `[rows, out]` buffer.
    pub fn forward(&self, x: &[f32], rows: usize, ldx: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.out];
        let accumulate = match &self.bias {
            Some(bias) => {
                y.par_chunks_mut(self.out * ROWS_PER_TASK).for_each(|r| {
                    r.chunks_exact_mut(self.out)
                        .for_each(|r| r.copy_from_slice(bias))
                });
                true
            }
            None => false,
        };
        self.forward_into(x, rows, ldx, &mut y, accumulate);
        y
    }

    /// `dst (+)= x · w` (the bias is not added).
    pub fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        ldx: usize,
        dst: &mut [f32],
        accumulate: bool,
    ) {
        matmul_w(
            rows,
            self.out,
            self.inp,
            Mat::rows(x, ldx),
            &self.w,
            dst,
            self.out,
            accumulate,
        );
    }

    /// `dst += x · w + bias`, e.g. a projection added onto the residual stream.
    pub fn accumulate(&self, x: &[f32], rows: usize, dst: &mut [f32]) {
        if let Some(bias) = &self.bias {
            dst.par_chunks_mut(self.out * ROWS_PER_TASK)
                .for_each(|r| add_rows(r, bias));
        }
        self.forward_into(x, rows, self.inp, dst, true);
    }
}

/// A square convolution; `w` is `[k, k, c_in, c_out]` row-major, i.e. a `[k·k·c_in, c_out]`
/// matrix whose rows follow the order of an im2col patch.
pub(crate) struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    /// Zero padding before (top, left) and after (bottom, right).
    pub pad: (usize, usize),
    pub w: Weight,
    pub bias: Vec<f32>,
}

/// Floats of one im2col tile (32 MiB): big enough for efficient products (all 512 pixels of
/// SD's 16×16 layers at once, so that their weights are streamed once), small enough to stay
/// out of the way of the activations.
const IM2COL_TILE: usize = 1 << 23;

impl Conv {
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |i: usize| (i + self.pad.0 + self.pad.1 - self.k) / self.stride + 1;
        (o(h), o(w))
    }

    /// A new output map: every row starts as `bias + row_add(image)`, then the convolution.
    pub fn forward(&self, x: &Map, row_add: Option<&[f32]>) -> Map {
        let (oh, ow) = self.out_size(x.h, x.w);
        let mut out = Map::filled_rows(x.b, oh, ow, self.cout, |i| match row_add {
            Some(t) => self
                .bias
                .iter()
                .zip(&t[i * self.cout..][..self.cout])
                .map(|(b, t)| b + t)
                .collect(),
            None => self.bias.clone(),
        });
        self.accumulate(x, &mut out);
        out
    }

    /// `out += conv(x)` without the bias; `out` has the output's shape.
    pub fn accumulate(&self, x: &Map, out: &mut Map) {
        let (oh, ow) = self.out_size(x.h, x.w);
        assert_eq!(x.c, self.cin, "conv input channels");
        assert!(
            out.b == x.b && out.h == oh && out.w == ow && out.c == self.cout,
            "conv output shape"
        );
        let kk = self.k * self.k * self.cin;
        let rows = x.b * oh * ow;
        if self.k == 1 && self.stride == 1 && self.pad == (0, 0) {
            matmul_w(
                rows,
                self.cout,
                self.cin,
                Mat::rows(&x.data, self.cin),
                &self.w,
                &mut out.data,
                self.cout,
                true,
            );
            return;
        }
        let tile = (IM2COL_TILE / kk).clamp(16, rows.max(16));
        let mut col = vec![0.0f32; tile.min(rows) * kk];
        let mut start = 0;
        while start < rows {
            let n = tile.min(rows - start);
            let col = &mut col[..n * kk];
            col.par_chunks_mut(kk * 16)
                .enumerate()
                .for_each(|(j, patches)| {
                    for (i, patch) in patches.chunks_exact_mut(kk).enumerate() {
                        self.patch(x, start + j * 16 + i, oh, ow, patch);
                    }
                });
            matmul_w(
                n,
                self.cout,
                kk,
                Mat::rows(col, kk),
                &self.w,
                &mut out.data[start * self.cout..],
                self.cout,
                true,
            );
            start += n;
        }
    }

    /// The im2col row of output pixel `p` (over the whole batch).
    fn patch(&self, x: &Map, p: usize, oh: usize, ow: usize, dst: &mut [f32]) {
        let (bi, y, xo) = (p / (oh * ow), (p / ow) % oh, p % ow);
        let c = self.cin;
        for (ky, row) in dst.chunks_exact_mut(self.k * c).enumerate() {
            let iy = (y * self.stride + ky).wrapping_sub(self.pad.0);
            for (kx, d) in row.chunks_exact_mut(c).enumerate() {
                let ix = (xo * self.stride + kx).wrapping_sub(self.pad.0);
                if iy < x.h && ix < x.w {
                    d.copy_from_slice(&x.data[((bi * x.h + iy) * x.w + ix) * c..][..c]);
                } else {
                    d.fill(0.0);
                }
            }
        }
    }
}

/// Compiles `$body` as a plain function and again with AVX2 enabled, picking the AVX2 copy
/// when the CPU has it: the loops below are written to be auto-vectorised.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// `e^x` to about 2 ulp for x in [-87, 88] (clamped outside), branch-free so that loops
/// calling it vectorise: Cody–Waite reduction `x = n·ln 2 + r`, Cephes' polynomial for
/// `e^r`, and `2^n` built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

/// `x · sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)`, Abramowitz–Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// The exact (erf) GELU, as PyTorch's `F.gelu` and diffusers' GEGLU.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

const LANES: usize = 8;

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Σ (x - mean)².
#[inline(always)]
fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a += d * d;
        }
    }
    acc.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>()
}

multiversion! {
    fn add_rows(rows: &mut [f32], bias: &[f32]) {
        for r in rows.chunks_exact_mut(bias.len()) {
            for (v, b) in r.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

multiversion! {
    /// Per-group sums of `Σx` (`dev == None`) or `Σ(x - mean_g)²` over the rows of `xs`.
    fn group_sums(xs: &[f32], c: usize, groups: usize, dev: Option<&[f32]>) -> Vec<f64> {
        let cg = c / groups;
        let mut out = vec![0.0f64; groups];
        for row in xs.chunks_exact(c) {
            for (g, (o, vals)) in out.iter_mut().zip(row.chunks_exact(cg)).enumerate() {
                *o += f64::from(match dev {
                    None => sum(vals),
                    Some(mean) => sum_sq_dev(vals, mean[g]),
                });
            }
        }
        out
    }
}

multiversion! {
    /// `y = x · scale + shift` per channel, then SiLU if asked.
    fn affine_rows(xs: &[f32], ys: &mut [f32], scale: &[f32], shift: &[f32], act: bool) {
        for (x, y) in xs.chunks_exact(scale.len()).zip(ys.chunks_exact_mut(scale.len())) {
            for (((x, y), a), b) in x.iter().zip(y.iter_mut()).zip(scale).zip(shift) {
                let v = x * a + b;
                *y = if act { silu(v) } else { v };
            }
        }
    }
}

/// Group normalisation of `x` (statistics per image and group, biased variance), with an
/// optional SiLU fused in.
pub(crate) struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl GroupNorm {
    pub fn forward(&self, x: &Map, silu: bool) -> Map {
        let (c, g) = (x.c, self.groups);
        assert_eq!(c, self.gamma.len(), "group norm channels");
        let cg = c / g;
        let hw = x.hw();
        let mut out = Map::zeros(x.b, x.h, x.w, c);
        if hw == 0 {
            return out;
        }
        let n = (hw * cg) as f64;
        // Partial sums per block of rows, added in order: the result must not depend on how
        // rayon split the work (same request, same pixels).
        let reduce = |image: &[f32], mean: Option<&[f32]>| -> Vec<f64> {
            let parts: Vec<Vec<f64>> = image
                .par_chunks(c * ROWS_PER_TASK)
                .map(|rows| group_sums(rows, c, g, mean))
                .collect();
            parts.iter().fold(vec![0.0; g], |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            })
        };
        for (image, dst) in x
            .data
            .chunks_exact(hw * c)
            .zip(out.data.chunks_exact_mut(hw * c))
        {
            let mean: Vec<f32> = reduce(image, None).iter().map(|s| (s / n) as f32).collect();
            let var = reduce(image, Some(&mean));
            let (scale, shift): (Vec<f32>, Vec<f32>) = self
                .gamma
                .iter()
                .zip(&self.beta)
                .enumerate()
                .map(|(ch, (gamma, beta))| {
                    let gi = ch / cg;
                    let a = (1.0 / (var[gi] / n + self.eps).sqrt()) as f32 * gamma;
                    (a, beta - mean[gi] * a)
                })
                .unzip();
            dst.par_chunks_mut(c * ROWS_PER_TASK)
                .zip(image.par_chunks(c * ROWS_PER_TASK))
                .for_each(|(y, x)| affine_rows(x, y, &scale, &shift, silu));
        }
        out
    }
}

multiversion! {
    fn layer_norm_rows(xs: &[f32], ys: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let c = gamma.len();
        for (x, y) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)) {
            let mean = sum(x) / c as f32;
            let var = sum_sq_dev(x, mean) / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((x, y), g), b) in x.iter().zip(y.iter_mut()).zip(gamma).zip(beta) {
                *y = (x - mean) * rstd * g + b;
            }
        }
    }
}

/// Layer normalisation over the channels of every row.
pub(crate) struct LayerNorm {
    pub eps: f32,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl LayerNorm {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let c = self.gamma.len();
        let mut y = vec![0.0; x.len()];
        y.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(y, x)| layer_norm_rows(x, y, &self.gamma, &self.beta, self.eps));
        y
    }
}

multiversion! {
    fn geglu_rows(xs: &[f32], ys: &mut [f32], inner: usize) {
        for (x, y) in xs.chunks_exact(2 * inner).zip(ys.chunks_exact_mut(inner)) {
            let (h, gate) = x.split_at(inner);
            for ((y, h), g) in y.iter_mut().zip(h).zip(gate) {
                *y = h * gelu(*g);
            }
        }
    }
}

/// GEGLU: rows `[hidden | gate]` (`2·inner` values) to `hidden · gelu(gate)`.
pub(crate) fn geglu(x: &[f32], inner: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len() / 2];
    y.par_chunks_mut(inner * ROWS_PER_TASK)
        .zip(x.par_chunks(2 * inner * ROWS_PER_TASK))
        .for_each(|(y, x)| geglu_rows(x, y, inner));
    y
}

multiversion! {
    /// Each row of `s` to `softmax(scale · row)`.
    fn softmax_rows(s: &mut [f32], n: usize, scale: f32) {
        for row in s.chunks_exact_mut(n) {
            let m = max(row);
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
                    let e = exp((*v - m) * scale);
                    *v = e;
                    *a += e;
                }
            }
            let mut total: f32 = acc.iter().sum();
            for v in chunks.into_remainder() {
                *v = exp((*v - m) * scale);
                total += *v;
            }
            let inv = 1.0 / total;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output blocks to rayon tasks (see `attention`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so that closures capture the whole `SendPtr` rather than the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Scores of one task (floats): 1 MiB, about a core's L2.
const SCORE_BLOCK: usize = 1 << 18;

/// Multi-head attention `softmax(scale · q kᵀ) v`, fused per block of query rows so that
/// the scores of a block stay in cache and the `[heads, nq, nk]` matrix never exists.
///
/// `q` holds `b·nq` rows, `k` and `v` `b·nk` rows (row strides `ldq`, `ldk`, `ldv`); head
/// `h` is columns `h·d..(h+1)·d` of each. Returns `[b·nq, heads·d]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: (&[f32], usize),
    k: (&[f32], usize),
    v: (&[f32], usize),
    b: usize,
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let c = heads * d;
    let mut out = vec![0.0f32; b * nq * c];
    if b * nq == 0 || c == 0 {
        return out;
    }
    assert!(nk > 0, "attention over no keys");
    let (q, ldq) = q;
    let (k, ldk) = k;
    let (v, ldv) = v;
    assert!(
        (b * nq - 1) * ldq + c <= q.len(),
        "attention queries too small"
    );
    assert!(
        (b * nk - 1) * ldk + c <= k.len(),
        "attention keys too small"
    );
    assert!(
        (b * nk - 1) * ldv + c <= v.len(),
        "attention values too small"
    );
    let bq = (SCORE_BLOCK / nk).clamp(8, 256).min(nq);
    let blocks = nq.div_ceil(bq);
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    #[cfg(target_arch = "x86_64")]
    if super::sgemm::available() {
        use super::sgemm::{gemm_packed, PackedB, Strided};
        // One task per image, head and run of query blocks, packing that head's keys and
        // values once; a few tasks per thread when there are few heads.
        // Query blocks of whole 12-row slivers.
        let bq = (bq / 12 * 12).max(12).min(nq);
        let blocks = nq.div_ceil(bq);
        let chunks = (4 * threads()).div_ceil(b * heads).clamp(1, blocks);
        let per_chunk = blocks.div_ceil(chunks);
        (0..b * heads * chunks).into_par_iter().for_each(|task| {
            let (bi, h, chunk) = (
                task / (heads * chunks),
                (task / chunks) % heads,
                task % chunks,
            );
            // B = kᵀ: element (p, j) = k[j, p]; B = v as it is. Both inside k and v
            // (asserted above).
            let kt = Strided {
                ptr: k[bi * nk * ldk + h * d..].as_ptr(),
                rs: 1,
                cs: ldk,
            };
            let vs = Strided {
                ptr: v[bi * nk * ldv + h * d..].as_ptr(),
                rs: ldv,
                cs: 1,
            };
            // SAFETY: d×nk and nk×d elements inside k and v (asserted above).
            let (kt, vs) = unsafe { (PackedB::new(kt, d, nk), PackedB::new(vs, nk, d)) };
            // Score rows padded so that the 12 rows a kernel reads in place are not 4 KiB
            // apart (they would share L1 sets).
            let ld = nk.next_multiple_of(16) + 16;
            let mut s = vec![0.0f32; bq * ld];
            let mut inv = vec![0.0f32; bq];
            for blk in chunk * per_chunk..((chunk + 1) * per_chunk).min(blocks) {
                let q0 = blk * bq;
                let rows = bq.min(nq - q0);
                let s = &mut s[..rows * ld];
                let qs = Strided {
                    ptr: q[(bi * nq + q0) * ldq + h * d..].as_ptr(),
                    rs: ldq,
                    cs: 1,
                };
                // SAFETY: AVX-512 is available; the queries are inside q (asserted above)
                // and s holds rows × nk values.
                unsafe { gemm_packed(rows, qs, &kt, s.as_mut_ptr(), ld, false) };
                // SAFETY: AVX-512 is available; s holds rows × nk values.
                unsafe {
                    super::sgemm::softmax_rows_unnormalized(s, nk, ld, scale, &mut inv[..rows])
                };
                let ps = Strided {
                    ptr: s.as_ptr(),
                    rs: ld,
                    cs: 1,
                };
                // SAFETY: as below for the other kernels: this task alone writes rows
                // bi·nq + q0.. + rows, columns h·d..(h+1)·d of `out`.
                unsafe {
                    let o = dst.get().add((bi * nq + q0) * c + h * d);
                    gemm_packed(rows, ps, &vs, o, c, false);
                    for (r, inv) in inv[..rows].iter().enumerate() {
                        std::slice::from_raw_parts_mut(o.add(r * c), d)
                            .iter_mut()
                            .for_each(|v| *v *= inv);
                    }
                };
            }
        });
        return out;
    }
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || vec![0.0f32; bq * nk],
        |s, task| {
            let (bi, h, blk) = (
                task / (heads * blocks),
                (task / blocks) % heads,
                task % blocks,
            );
            let q0 = blk * bq;
            let rows = bq.min(nq - q0);
            let s = &mut s[..rows * nk];
            let qm = Mat::rows(&q[(bi * nq + q0) * ldq + h * d..], ldq);
            let km = Mat::transposed(&k[bi * nk * ldk + h * d..], ldk);
            let vm = Mat::rows(&v[bi * nk * ldv + h * d..], ldv);
            matmul(rows, nk, d, qm, km, s, nk, false, false);
            softmax_rows(s, nk, scale);
            // SAFETY: task (bi, h, blk) writes rows bi·nq + q0.. + rows, columns
            // h·d..(h+1)·d of `out`: inside it (asserted above) and disjoint from every
            // other task's block; `out` is not touched otherwise until all tasks end.
            unsafe {
                matmul_raw(
                    rows,
                    d,
                    nk,
                    Mat::rows(s, nk),
                    vm,
                    dst.get().add((bi * nq + q0) * c + h * d),
                    c,
                    false,
                    false,
                );
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst = 0.0f64;
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "exp relative error {worst}");
        // erf(0.5), erf(1), erf(2) from tables.
        for (x, want) in [
            (0.5f32, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265),
        ] {
            assert!((erf(x) as f64 - want).abs() < 3e-7);
            assert!((erf(-x) as f64 + want).abs() < 3e-7);
        }
    }

    #[test]
    fn attention_matches_the_naive_formula() {
        let (b, nq, nk, heads, d) = (2, 37, 19, 3, 5);
        let c = heads * d;
        let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 25.0;
        let q: Vec<f32> = (0..b * nq * c).map(val).collect();
        let kv: Vec<f32> = (0..b * nk * 2 * c).map(|i| val(i + 13)).collect();
        let scale = 0.4;
        let out = attention(
            (&q, c),
            (&kv, 2 * c),
            (&kv[c..], 2 * c),
            b,
            nq,
            nk,
            heads,
            d,
            scale,
        );
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    let qi = &q[(bi * nq + i) * c + h * d..][..d];
                    let scores: Vec<f32> = (0..nk)
                        .map(|j| {
                            let kj = &kv[(bi * nk + j) * 2 * c + h * d..][..d];
                            scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for t in 0..d {
                        let want: f32 = (0..nk)
                            .map(|j| e[j] / z * kv[(bi * nk + j) * 2 * c + c + h * d + t])
                            .sum();
                        let got = out[(bi * nq + i) * c + h * d + t];
                        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn conv_matches_the_naive_formula() {
        for (stride, pad) in [(1, (1, 1)), (2, (1, 1)), (2, (0, 1))] {
            let (b, h, w, cin, cout, k) = (2, 7, 6, 3, 4, 3);
            let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 25.0;
            let x = Map {
                b,
                h,
                w,
                c: cin,
                data: (0..b * h * w * cin).map(val).collect(),
            };
            let wv: Vec<f32> = (0..k * k * cin * cout).map(|i| val(i + 3)).collect();
            let conv = Conv {
                cin,
                cout,
                k,
                stride,
                pad,
                w: Weight::new(wv.clone(), k * k * cin, cout),
                bias: (0..cout).map(|i| i as f32).collect(),
            };
            let y = conv.forward(&x, None);
            let (oh, ow) = conv.out_size(h, w);
            assert_eq!((y.h, y.w), (oh, ow));
            for bi in 0..b {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for co in 0..cout {
                            let mut want = conv.bias[co];
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad.0 as isize;
                                    let ix = (ox * stride + kx) as isize - pad.0 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    for ci in 0..cin {
                                        want += x.data
                                            [((bi * h + iy as usize) * w + ix as usize) * cin + ci]
                                            * wv[((ky * k + kx) * cin + ci) * cout + co];
                                    }
                                }
                            }
                            let got = y.data[((bi * oh + oy) * ow + ox) * cout + co];
                            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
