//! An f32 matrix product for x86-64 CPUs with AVX-512: `C += A · B`.
//!
//! The `gemm` crate (candle's) reaches about a quarter of what MKL does on AVX-512 machines,
//! and the UNet is almost all matrix products, so this is the classic packed design
//! (Goto/BLIS): `B` is packed into `NR`-column slivers, contiguous in `k` within slices of
//! [`KC`] rows; tasks of [`MC`] rows of `C` (in parallel on the rayon pool; split by columns
//! too when there are few) pack `MR`-row slivers of `A` per slice and run a 12×32 register
//! micro-kernel: 24 zmm accumulators, 24 FMAs per two loads of `B` and 12 broadcasts of `A`.
//! Partial tiles at the edges are computed into a scratch tile and added back.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::{
    __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_fnmadd_ps, _mm512_loadu_ps, _mm512_mask_add_ps,
    _mm512_mask_loadu_ps, _mm512_mask_storeu_ps, _mm512_max_ps, _mm512_mul_ps,
    _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    _mm512_sub_ps,
};

use rayon::prelude::*;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 256;
/// Rows of one task (a multiple of `MR`): its packed `A` (`MC × KC`, 120 KiB) stays in L2.
const MC: usize = 120;

/// Whether this CPU runs [`sgemm`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// A strided matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}
// SAFETY: a read-only view; `sgemm`'s caller guarantees nobody writes it meanwhile.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// The view whose element (0, 0) is this one's `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must be inside the matrix.
    unsafe fn at(self, i: usize, j: usize) -> Self {
        Self {
            // SAFETY: inside the matrix (caller).
            ptr: unsafe { self.ptr.add(i * self.rs + j * self.cs) },
            ..self
        }
    }
}

#[derive(Clone, Copy)]
struct SendMut(*mut f32);
// SAFETY: tasks write disjoint tiles of C (see `sgemm`).
unsafe impl Send for SendMut {}
unsafe impl Sync for SendMut {}

impl SendMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`, `C` row-major with leading dimension `ldc`; without
/// `accumulate`, `C`'s old values are ignored.
///
/// # Safety
/// [`available`] must be true; `a` and `b` must be readable at every `(i, p)`, `(p, j)` of
/// the shapes; `c` writable at `i·ldc + j` for `i < m`, `j < n`, with no other access to
/// those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threaded: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of C (caller).
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) }.fill(0.0);
            }
        }
        return;
    }
    let threaded = threaded && rayon::current_num_threads() > 1 && m * n * k >= 1 << 20;
    // Column chunks of B small enough to stay in cache while every row block runs over
    // them (at least one sliver wide).
    let chunk = (B_CHUNK / k).max(NR) / NR * NR;
    let mut j0 = 0;
    while j0 < n {
        let width = chunk.min(n - j0);
        // SAFETY: columns j0..j0 + width of B (caller); column j0 < n of C.
        unsafe {
            let b = PackedB::pack(b.at(0, j0), k, width, threaded);
            row_blocks(m, a, &b, 0..width, c.add(j0), ldc, accumulate, threaded);
        }
        j0 += width;
    }
}

/// Up to this many rows (a few row blocks), [`sgemm_packed`] does not cut `B` into chunks:
/// each chunk would re-read all of `A` for little `B` reuse.
const SMALL_M: usize = 1024;

/// Floats of packed `B` per column chunk of [`sgemm`] (8 MiB).
const B_CHUNK: usize = 1 << 21;

/// `C (+)= A · B` for columns `cols` of packed `B`, in tasks of [`MC`] rows (split by columns too when there
/// are few row blocks), each running every `k` slice so that its rows of C stay in cache.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn row_blocks(
    m: usize,
    a: Strided,
    b: &PackedB,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threaded: bool,
) {
    let slivers = cols.len().div_ceil(NR);
    let mc = MC;
    let row_tasks = m.div_ceil(mc);
    let want = 4 * rayon::current_num_threads();
    let col_tasks = if threaded && row_tasks < want {
        want.div_ceil(row_tasks).min(slivers)
    } else {
        1
    };
    let cols_per_task = slivers.div_ceil(col_tasks) * NR;
    let c = SendMut(c);
    let task = |t: usize| {
        let (rt, ct) = (t / col_tasks, t % col_tasks);
        let i0 = rt * mc;
        let j0 = cols.start + ct * cols_per_task;
        if j0 >= cols.end {
            return;
        }
        // SAFETY: row i0 < m of A.
        let a_rows = unsafe { a.at(i0, 0) };
        // SAFETY: AVX-512 (caller); rows i0.. and columns j0.. of C belong to this task.
        unsafe {
            gemm_packed_cols(
                mc.min(m - i0),
                a_rows,
                b,
                j0..(j0 + cols_per_task).min(cols.end),
                c.get().add(i0 * ldc),
                ldc,
                accumulate,
            )
        };
    };
    if threaded {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * col_tasks).for_each(task);
    }
}

/// `C[m×n] (+)= A[m×k] · B` with `B` packed beforehand (e.g. weights), on the rayon pool
/// with `threaded`.
///
/// # Safety
/// As [`sgemm`], with `k`, `n` those of `b`.
pub(crate) unsafe fn sgemm_packed(
    m: usize,
    a: Strided,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threaded: bool,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threaded = threaded && rayon::current_num_threads() > 1 && m * n * k >= 1 << 20;
    let chunk = if m <= SMALL_M {
        n
    } else {
        (B_CHUNK / k).max(NR) / NR * NR
    };
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + chunk).min(n);
        // SAFETY: as the caller guarantees.
        unsafe { row_blocks(m, a, b, j0..j1, c, ldc, accumulate, threaded) };
        j0 = j1;
    }
}

/// `B` packed once for several products with it ([`gemm_packed`]): per slice of `KC` rows,
/// `NR`-column slivers contiguous in `k`.
pub(crate) struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `B[k×n]`.
    ///
    /// # Safety
    /// `b` must be readable at every `(p, j)`, `p < k`, `j < n`.
    pub unsafe fn new(b: Strided, k: usize, n: usize) -> Self {
        // SAFETY: as the caller guarantees.
        unsafe { Self::pack(b, k, n, false) }
    }

    /// [`new`](Self::new), slivers packed in parallel with `threaded`.
    pub unsafe fn pack(b: Strided, k: usize, n: usize, threaded: bool) -> Self {
        let slivers = n.div_ceil(NR);
        let mut data = vec![0.0f32; slivers * NR * k];
        let mut p0 = 0;
        while p0 < k {
            let kc = (k - p0).min(KC);
            // SAFETY: row p0 < k of B.
            let slice = unsafe { b.at(p0, 0) };
            let region = &mut data[p0 * slivers * NR..][..slivers * NR * kc];
            // SAFETY: rows < kc and columns s·NR.. < n of this slice.
            let pack_one = |(s, dst): (usize, &mut [f32])| unsafe {
                pack(slice, s * NR, n, kc, NR, dst, false)
            };
            if threaded {
                region
                    .par_chunks_mut(NR * kc)
                    .enumerate()
                    .for_each(pack_one);
            } else {
                region.chunks_mut(NR * kc).enumerate().for_each(pack_one);
            }
            p0 += kc;
        }
        Self { data, k, n }
    }
}

/// `C[m×n] (+)= A[m×k] · B` on this thread, with `B` packed beforehand.
///
/// # Safety
/// As [`sgemm`], with `k`, `n` those of `b`.
pub(crate) unsafe fn gemm_packed(
    m: usize,
    a: Strided,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: as the caller guarantees.
    unsafe { gemm_packed_cols(m, a, b, 0..b.n, c, ldc, accumulate) }
}

/// [`gemm_packed`] for columns `cols` of `C` only (`cols.start` a multiple of `NR`); `c`
/// still points at column 0.
///
/// # Safety
/// As [`gemm_packed`], for those columns.
unsafe fn gemm_packed_cols(
    m: usize,
    a: Strided,
    b: &PackedB,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || cols.is_empty() || k == 0 {
        return;
    }
    debug_assert!(cols.start.is_multiple_of(NR) && cols.end <= n);
    let slivers = n.div_ceil(NR);
    let mut a_sliver = [0.0f32; MR * KC];
    let mut p0 = 0;
    while p0 < k {
        let kc = (k - p0).min(KC);
        let overwrite = p0 == 0 && !accumulate;
        // SAFETY: column p0 < k of A.
        let a_slice = unsafe { a.at(0, p0) };
        let pb = &b.data[p0 * slivers * NR..][..slivers * NR * kc];
        for i in (0..m).step_by(MR) {
            let rows = (m - i).min(MR);
            // Full slivers of a row-major A are read in place (row stride `a.rs`); others
            // are packed, zero-padded.
            let src = if rows == MR && a.cs == 1 {
                // SAFETY: row i < m of this slice of A.
                ASliver::Rows(unsafe { a_slice.at(i, 0) }.ptr, a.rs)
            } else {
                let a_sliver = &mut a_sliver[..MR * kc];
                // SAFETY: rows i.. < m, columns < kc of this slice of A.
                unsafe { pack(a_slice, i, m, kc, MR, a_sliver, true) };
                ASliver::Packed(a_sliver.as_ptr())
            };
            for j in cols.clone().step_by(NR) {
                let b_sliver = &pb[(j / NR) * NR * kc..][..NR * kc];
                // SAFETY: AVX-512 (caller); tile (i.., j..) is inside C.
                unsafe {
                    tile(
                        kc,
                        src,
                        b_sliver,
                        c.add(i * ldc + j),
                        ldc,
                        rows,
                        (cols.end - j).min(NR),
                        overwrite,
                    )
                };
            }
        }
        p0 += kc;
    }
}

/// Where the kernel reads `MR` rows × `kc` of A.
#[derive(Clone, Copy)]
enum ASliver {
    /// Packed: element (r, p) at `p·MR + r`.
    Packed(*const f32),
    /// In place: element (r, p) at `r·stride + p`.
    Rows(*const f32, usize),
}

/// One `rows × cols` tile (at most `MR × NR`) of `C (+)= A_sliver · B_sliver`.
///
/// # Safety
/// AVX-512F; `a` holds the sliver's `MR × kc` elements, `b` `kc·NR`; `c` rows
/// `r·ldc .. + cols`, `r < rows`, writable.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile(
    kc: usize,
    a: ASliver,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    overwrite: bool,
) {
    debug_assert!(b.len() >= NR * kc);
    let b = b.as_ptr();
    // SAFETY: as the caller guarantees; partial tiles go through a scratch tile.
    unsafe {
        let run = |c: *mut f32, ldc: usize, overwrite: bool| match (a, cols <= NR / 2) {
            (ASliver::Packed(a), false) => kernel::<false, false>(kc, a, 0, b, c, ldc, overwrite),
            (ASliver::Rows(a, lda), false) => {
                kernel::<true, false>(kc, a, lda, b, c, ldc, overwrite)
            }
            (ASliver::Packed(a), true) => kernel::<false, true>(kc, a, 0, b, c, ldc, overwrite),
            (ASliver::Rows(a, lda), true) => kernel::<true, true>(kc, a, lda, b, c, ldc, overwrite),
        };
        if rows == MR && cols == NR {
            run(c, ldc, overwrite);
        } else {
            let mut t = [0.0f32; MR * NR];
            run(t.as_mut_ptr(), NR, true);
            for r in 0..rows {
                let dst = std::slice::from_raw_parts_mut(c.add(r * ldc), cols);
                let src = &t[r * NR..][..cols];
                if overwrite {
                    dst.copy_from_slice(src);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        }
    }
}

/// Packs slivers for the kernel: with `rows_of_a`, rows `first..first + width` of `m` (the
/// rows of A) over `kc` columns as `dst[p·width + r]`; otherwise columns `first..` of B over
/// `kc` rows as `dst[p·width + q]`. Past `limit`, zeros.
///
/// # Safety
/// Every element read must be inside the matrix.
unsafe fn pack(
    x: Strided,
    first: usize,
    limit: usize,
    kc: usize,
    width: usize,
    dst: &mut [f32],
    rows_of_a: bool,
) {
    let valid = limit.saturating_sub(first).min(width);
    // (stride along the sliver's width, stride along k)
    let (ws, ks) = if rows_of_a {
        (x.rs, x.cs)
    } else {
        (x.cs, x.rs)
    };
    // SAFETY (for every `add` below): the caller guarantees rows/columns `first + w` for
    // `w < valid` and `p < kc` are inside the matrix.
    let base = unsafe { x.ptr.add(first * ws) };
    if ws == 1 {
        for (p, d) in dst.chunks_exact_mut(width).enumerate().take(kc) {
            let src = unsafe { std::slice::from_raw_parts(base.add(p * ks), valid) };
            d[..valid].copy_from_slice(src);
            d[valid..].fill(0.0);
        }
    } else {
        for w in 0..width {
            if w < valid {
                let src = unsafe { base.add(w * ws) };
                for p in 0..kc {
                    dst[p * width + w] = unsafe { *src.add(p * ks) };
                }
            } else {
                for p in 0..kc {
                    dst[p * width + w] = 0.0;
                }
            }
        }
    }
}

/// `C[MR×NR] (+)= A_sliver · B_sliver` over `kc` (`overwrite`: `=`); A packed
/// (`ROWS == false`: element (r, p) at `p·MR + r`) or in place (row stride `lda`). `HALF`:
/// only the first `NR / 2` columns (the rest of `C` is left alone), for narrow last slivers.
///
/// # Safety
/// AVX-512F; `a` holds the sliver's `MR × kc` elements, `b` `kc·NR` floats; `c` rows
/// `r·ldc .. + NR` for `r < MR` are writable.
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const ROWS: bool, const HALF: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    // `wrapping_add`: the offsets stay inside the slivers, and unlike `add` it carries no
    // debug-build precondition check, which would cost the accumulators their registers.
    let mut acc: [[__m512; 2]; MR] = [[_mm512_setzero_ps(); 2]; MR];
    let mut a = a;
    let mut b = b;
    for _ in 0..kc {
        // SAFETY: within the slivers (caller).
        unsafe {
            let b0 = _mm512_loadu_ps(b);
            let b1 = if HALF {
                b0
            } else {
                _mm512_loadu_ps(b.wrapping_add(16))
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm512_set1_ps(*a.wrapping_add(if ROWS { r * lda } else { r }));
                acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
                if !HALF {
                    acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
                }
            }
        }
        a = a.wrapping_add(if ROWS { 1 } else { MR });
        b = b.wrapping_add(NR);
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.wrapping_add(r * ldc);
        // SAFETY: row r of the tile (caller).
        unsafe {
            let hi = row.wrapping_add(16);
            if overwrite {
                _mm512_storeu_ps(row, acc[0]);
                if !HALF {
                    _mm512_storeu_ps(hi, acc[1]);
                }
            } else {
                _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[0]));
                if !HALF {
                    _mm512_storeu_ps(hi, _mm512_add_ps(_mm512_loadu_ps(hi), acc[1]));
                }
            }
        }
    }
}

/// `e^x` on 16 lanes for `x <= 0` (softmax): Cody–Waite reduction `x = n·ln 2 + r` and
/// Cephes' polynomial for `e^r`, then `· 2^n` by `scalef`; about 2 ulp, 0 below -87.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<0x08>(t);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(p, n)
}

/// Each `n`-long row of `s` (row stride `ld`) to `e^(scale·(x - max))`, and `inv[row]` to
/// the inverse of the row's sum: softmax without the final division, which the caller
/// applies to the (much smaller) product with the values.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_rows_unnormalized(
    s: &mut [f32],
    n: usize,
    ld: usize,
    scale: f32,
    inv: &mut [f32],
) {
    let rows = inv.len();
    assert!(
        n > 0 && ld >= n && (rows == 0 || s.len() >= (rows - 1) * ld + n),
        "softmax rows"
    );
    let full = n / 16;
    let tail = (n % 16) as u32;
    let tail_mask: u16 = ((1u32 << tail) - 1) as u16;
    for (r, inv) in inv.iter_mut().enumerate() {
        let p = s[r * ld..][..n].as_mut_ptr();
        // SAFETY: `full` chunks of 16 and a masked tail, all inside the row.
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in 0..full {
                m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(16 * i)));
            }
            if tail > 0 {
                let v = _mm512_mask_loadu_ps(m, tail_mask, p.add(16 * full));
                m = _mm512_max_ps(m, v);
            }
            let mut lanes = [0.0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), m);
            let max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let (mx, sc) = (_mm512_set1_ps(max), _mm512_set1_ps(scale));
            let mut sum = _mm512_setzero_ps();
            for i in 0..full {
                let e = exp16(_mm512_mul_ps(
                    _mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), mx),
                    sc,
                ));
                _mm512_storeu_ps(p.add(16 * i), e);
                sum = _mm512_add_ps(sum, e);
            }
            if tail > 0 {
                let v = _mm512_mask_loadu_ps(mx, tail_mask, p.add(16 * full));
                let e = exp16(_mm512_mul_ps(_mm512_sub_ps(v, mx), sc));
                _mm512_mask_storeu_ps(p.add(16 * full), tail_mask, e);
                sum = _mm512_mask_add_ps(sum, tail_mask, sum, e);
            }
            _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
            *inv = 1.0 / lanes.iter().sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], b_t: bool) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += a[i * k + p] as f64 * bv as f64;
                }
            }
        }
        c
    }

    #[test]
    fn products_match_the_naive_formula() {
        if !available() {
            return;
        }
        let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) / 50.0;
        // Edges in every direction: rows past MC and not a multiple of MR, k past KC,
        // columns not a multiple of NR (and below NR / 2).
        for (m, n, k) in [(131, 45, 300), (13, 8, 7), (250, 70, 600), (12, 32, 256)] {
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 17)).collect();
            for (b_t, accumulate, threaded) in [
                (false, false, false),
                (false, true, true),
                (true, false, true),
            ] {
                let bs = if b_t {
                    Strided {
                        ptr: b.as_ptr(),
                        rs: 1,
                        cs: k,
                    }
                } else {
                    Strided {
                        ptr: b.as_ptr(),
                        rs: n,
                        cs: 1,
                    }
                };
                let a_s = Strided {
                    ptr: a.as_ptr(),
                    rs: k,
                    cs: 1,
                };
                let mut c = vec![1.0f32; m * n];
                // SAFETY: AVX-512 checked above; the shapes match the buffers.
                unsafe { sgemm(m, n, k, a_s, bs, c.as_mut_ptr(), n, accumulate, threaded) };
                let mut d = vec![1.0f32; m * n];
                // SAFETY: as above.
                unsafe {
                    let packed = PackedB::new(bs, k, n);
                    gemm_packed(m, a_s, &packed, d.as_mut_ptr(), n, accumulate);
                }
                let want = naive(m, n, k, &a, &b, b_t);
                for ((got, got2), want) in c.iter().zip(&d).zip(&want) {
                    let want = want + if accumulate { 1.0 } else { 0.0 };
                    assert!(
                        (*got as f64 - want).abs() < 1e-3,
                        "{m}x{n}x{k}: {got} vs {want}"
                    );
                    assert!(
                        (*got2 as f64 - want).abs() < 1e-3,
                        "{m}x{n}x{k}: {got2} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        if !available() {
            return;
        }
        for n in [5usize, 16, 77, 100] {
            let ld = n + 3;
            let mut s: Vec<f32> = (0..2 * ld).map(|i| (i % 13) as f32 - 6.0).collect();
            let orig = s.clone();
            let mut inv = [0.0f32; 2];
            // SAFETY: AVX-512 checked above; two rows of n at stride ld.
            unsafe { softmax_rows_unnormalized(&mut s, n, ld, 0.7, &mut inv) };
            for r in 0..2 {
                let row = &orig[r * ld..][..n];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = row.iter().map(|x| ((x - m) as f64 * 0.7).exp()).sum();
                for (got, x) in s[r * ld..][..n].iter().zip(row) {
                    let want = ((x - m) as f64 * 0.7).exp();
                    assert!((*got as f64 - want).abs() < 1e-6 * want.max(1.0));
                }
                assert!((inv[r] as f64 * z - 1.0).abs() < 1e-6);
            }
        }
    }
}
