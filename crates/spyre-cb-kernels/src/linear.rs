//! `y = x W^T (+ b)` in bfloat16 or `f32`, on weights packed once at load.
//!
//! A decode step multiplies a handful of rows (one per running sequence) by
//! every weight matrix of the model, so it is bound by reading the weights
//! from memory. [`pack_bf16`] reorders a weight (`[out_features,
//! in_features]`, as torch stores an `nn.Linear`'s) once into blocks of
//! [`FEATURES`] output features, each block holding, for every pair of inner
//! elements, the pair of every feature: `[blocks][in/2][FEATURES][2]`. One
//! 64-byte load then gives the next pair of 16 features, and a `vdpbf16ps`
//! (AVX512_BF16) multiplies it by one input row's pair broadcast to every
//! lane and adds into `f32` sums that are already the outputs — no horizontal
//! sums. [`linear_bf16`] walks the blocks in memory order, each block once
//! per group of up to [`ROWS`] input rows while it sits in the second-level
//! cache, and prefetches the next block while it multiplies this one, so
//! the weights stream at about the rate the core can read memory. Sums are
//! `f32`, rounded once to bfloat16 (to nearest, ties to even, as torch
//! rounds). In `f32` the blocks hold one inner element of every feature at a
//! time and the products are fused multiply-adds (AVX-512F). Without those
//! instructions a portable loop computes the same sums up to their order.

use std::fmt;
use std::ops::Range;
use std::sync::Mutex;

use crate::math::CacheElem;
use crate::parallel;

/// Output features in one packed block (two 512-bit registers of `f32` sums).
pub const FEATURES: usize = 32;
/// Input rows multiplied by a block at a time (their sums fill 16 registers).
const ROWS: usize = 8;
/// Bytes of input rows multiplied by every block before the next rows are:
/// they stay in the second-level cache with a block while the weights stream.
const ROW_BLOCK_BYTES: usize = 256 << 10;
/// Input rows that always share one pass over the weights (a decode batch of
/// up to 32 streams every weight once, whatever the inner size).
const MIN_ROW_BLOCK: usize = 32;
/// Weight elements below which one more thread does not pay for its start
/// (starting one costs tens of microseconds; a core reads ~1M elements in 100).
const MIN_WEIGHTS_PER_THREAD: usize = 1 << 22;
/// The same on a host's running workers ([`parallel::set_fork_join`]): waking
/// them costs a few microseconds, in which a core reads ~64K elements.
const MIN_WEIGHTS_PER_POOLED_THREAD: usize = 1 << 18;

/// Sizes of one call: `x` is `[rows, in_features]`, the weight
/// `[out_features, in_features]` (packed), the result `[rows, out_features]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// An input the linear kernels refuse (before reading anything; the output is
/// left untouched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinearError {
    /// A buffer's length disagrees with the shape.
    Length { what: &'static str, expected: usize, got: usize },
}

impl fmt::Display for LinearError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { what, expected, got } => {
                write!(f, "linear: {what} holds {got} elements where the shape needs {expected}")
            }
        }
    }
}

impl std::error::Error for LinearError {}

/// An element type the kernel runs: bfloat16 (as its bits, `u16`) or `f32`.
pub trait Element: Copy + Default + Send + Sync + 'static {
    /// Consecutive inner elements of one feature packed together (a
    /// `vdpbf16ps` multiplies pairs of bfloat16; an `f32` FMA one element).
    const PACK: usize;
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
    /// Whether this CPU runs the vectorized kernel for this element.
    fn is_fast() -> bool;
    /// `R` input rows times one packed block, see [`avx512`].
    ///
    /// # Safety
    /// The CPU has the instructions [`Element::is_fast`] checks; the slices
    /// hold what the block walk gives.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<const R: usize>(
        w: &[Self],
        xs: &[Self],
        k: usize,
        prefetch: &[Self],
        bias: Option<&[Self]>,
        out: &mut [Self],
        width: usize,
        cols: usize,
    );
}

impl Element for u16 {
    const PACK: usize = 2;
    #[inline(always)]
    fn widen(self) -> f32 {
        CacheElem::f32(self)
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        round_bf16(v)
    }
    fn is_fast() -> bool {
        linear_bf16_is_fast()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn group<const R: usize>(
        w: &[u16],
        xs: &[u16],
        k: usize,
        prefetch: &[u16],
        bias: Option<&[u16]>,
        out: &mut [u16],
        width: usize,
        cols: usize,
    ) {
        unsafe { avx512::group_bf16::<R>(w, xs, k, prefetch, bias, out, width, cols) }
    }
}

impl Element for f32 {
    const PACK: usize = 1;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
    fn is_fast() -> bool {
        linear_f32_is_fast()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const R: usize>(
        w: &[f32],
        xs: &[f32],
        k: usize,
        prefetch: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        width: usize,
        cols: usize,
    ) {
        unsafe { avx512::group_f32::<R>(w, xs, k, prefetch, bias, out, width, cols) }
    }
}

/// Elements of a packed weight of `out_features x in_features`: both padded
/// with zeros, the features to whole blocks and the inner size to whole packs.
pub fn packed_len<E: Element>(out_features: usize, in_features: usize) -> usize {
    out_features.next_multiple_of(FEATURES) * in_features.next_multiple_of(E::PACK)
}

/// Reorders `weight` (`[out_features, in_features]`, row-major) into `packed`
/// ([`packed_len`] elements) for [`linear`]: `[blocks][in / PACK][FEATURES][PACK]`.
pub fn pack<E: Element>(
    weight: &[E],
    out_features: usize,
    in_features: usize,
    packed: &mut [E],
) -> Result<(), LinearError> {
    check("weight", out_features * in_features, weight.len())?;
    check("packed", packed_len::<E>(out_features, in_features), packed.len())?;
    let groups = in_features.div_ceil(E::PACK);
    for (block, dst) in packed.chunks_exact_mut(groups * E::PACK * FEATURES).enumerate() {
        for (group, dst) in dst.chunks_exact_mut(E::PACK * FEATURES).enumerate() {
            for f in 0..FEATURES {
                let feature = block * FEATURES + f;
                for t in 0..E::PACK {
                    let i = E::PACK * group + t;
                    dst[E::PACK * f + t] = if feature < out_features && i < in_features {
                        weight[feature * in_features + i]
                    } else {
                        E::default()
                    };
                }
            }
        }
    }
    Ok(())
}

fn check(what: &'static str, expected: usize, got: usize) -> Result<(), LinearError> {
    if expected == got {
        Ok(())
    } else {
        Err(LinearError::Length { what, expected, got })
    }
}

/// Whether this CPU runs the vectorized kernel (AVX512_BF16); without it
/// [`linear_bf16`] still gives the right numbers, slowly.
pub fn linear_bf16_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the vectorized `f32` kernel (AVX-512F).
pub fn linear_f32_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out = x weight^T + bias` (bfloat16 given as its bits, or `f32`), the
/// weight packed by [`pack`]; split over up to `threads` threads (the
/// calling one included) by block of output features when the weight is
/// large enough to pay for them.
pub fn linear<E: Element>(
    shape: &LinearShape,
    x: &[E],
    packed: &[E],
    bias: Option<&[E]>,
    out: &mut [E],
    threads: usize,
) -> Result<(), LinearError> {
    let LinearShape { rows, in_features: k, out_features: n } = *shape;
    check("x", rows * k, x.len())?;
    check("packed weight", packed_len::<E>(n, k), packed.len())?;
    if let Some(b) = bias {
        check("bias", n, b.len())?;
    }
    check("out", rows * n, out.len())?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(FEATURES);
    let min_weights = if parallel::pooled() { MIN_WEIGHTS_PER_POOLED_THREAD } else { MIN_WEIGHTS_PER_THREAD };
    let threads = threads.min(n * k / min_weights).min(blocks).max(1);
    if threads == 1 {
        features(shape, x, packed, bias, 0..blocks, out);
        return Ok(());
    }
    // each thread gets whole blocks; its part of the result ([rows, its
    // features]) is copied into place after (a few KB)
    let per_thread = blocks.div_ceil(threads);
    let part = |t: usize| (t * per_thread).min(blocks)..((t + 1) * per_thread).min(blocks);
    let columns = |t: usize| part(t).start * FEATURES..(part(t).end * FEATURES).min(n);
    let mut scratch = vec![E::default(); rows * n];
    let mut rest = scratch.as_mut_slice();
    let mut bufs = Vec::with_capacity(threads);
    for t in 0..threads {
        let (buf, tail) = rest.split_at_mut(rows * columns(t).len());
        bufs.push(Mutex::new(buf));
        rest = tail;
    }
    parallel::for_each(threads, threads, &|t| {
        let mut buf = bufs[t].lock().unwrap_or_else(|e| e.into_inner());
        features(shape, x, packed, bias, part(t), &mut buf);
    });
    for (t, buf) in bufs.into_iter().enumerate() {
        let cols = columns(t);
        let buf = buf.into_inner().unwrap_or_else(|e| e.into_inner());
        if cols.is_empty() {
            continue;
        }
        for (row, src) in buf.chunks_exact(cols.len()).enumerate() {
            out[row * n + cols.start..row * n + cols.end].copy_from_slice(src);
        }
    }
    Ok(())
}

/// Output feature blocks `blocks` of every row into `out`
/// (`[rows, the features of those blocks]`).
fn features<E: Element>(
    shape: &LinearShape,
    x: &[E],
    packed: &[E],
    bias: Option<&[E]>,
    blocks: Range<usize>,
    out: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if E::is_fast() {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { avx512::features(shape, x, packed, bias, blocks, out) };
            return;
        }
    }
    portable_features(shape, x, packed, bias, blocks, out);
}

/// bfloat16 bits of an `f32`, rounded to nearest, ties to even (NaN stays NaN).
#[inline(always)]
pub fn round_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
}

fn portable_features<E: Element>(
    shape: &LinearShape,
    x: &[E],
    packed: &[E],
    bias: Option<&[E]>,
    blocks: Range<usize>,
    out: &mut [E],
) {
    let (k, n) = (shape.in_features, shape.out_features);
    let block_len = k.div_ceil(E::PACK) * E::PACK * FEATURES;
    let first = blocks.start * FEATURES;
    let width = (blocks.end * FEATURES).min(n) - first;
    for block in blocks {
        let w = &packed[block * block_len..(block + 1) * block_len];
        for row in 0..shape.rows {
            let xr = &x[row * k..(row + 1) * k];
            let mut sums = [0.0f32; FEATURES];
            for (group, wg) in w.chunks_exact(E::PACK * FEATURES).enumerate() {
                for t in 0..E::PACK {
                    let i = E::PACK * group + t;
                    let xi = if i < k { xr[i].widen() } else { 0.0 };
                    for (f, s) in sums.iter_mut().enumerate() {
                        *s += wg[E::PACK * f + t].widen() * xi;
                    }
                }
            }
            for (f, s) in sums.iter().enumerate() {
                let feature = block * FEATURES + f;
                if feature < n {
                    let b = bias.map_or(0.0, |b| b[feature].widen());
                    out[row * width + feature - first] = E::narrow(s + b);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Element, LinearShape, FEATURES, MIN_ROW_BLOCK, ROWS, ROW_BLOCK_BYTES};
    use crate::math::mask;

    /// Walks the blocks of output features, each once per block of input rows,
    /// a group of up to [`ROWS`] rows at a time ([`Element::group`]).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn features<E: Element>(
        shape: &LinearShape,
        x: &[E],
        packed: &[E],
        bias: Option<&[E]>,
        blocks: Range<usize>,
        out: &mut [E],
    ) {
        let (k, n) = (shape.in_features, shape.out_features);
        let block_len = k.div_ceil(E::PACK) * E::PACK * FEATURES;
        let first = blocks.start * FEATURES;
        let width = (blocks.end * FEATURES).min(n) - first;
        // input rows are taken a row block at a time (256 KB of them, at least 32
        // rows) that stays in the second-level cache while every weight block
        // streams past: a decode's rows are one row block, a prefill's several
        let row_block = (ROW_BLOCK_BYTES / (size_of::<E>() * k)).max(MIN_ROW_BLOCK).next_multiple_of(ROWS);
        let mut row0 = 0;
        while row0 < shape.rows {
            let block_rows = row_block.min(shape.rows - row0);
            let groups = block_rows.div_ceil(ROWS);
            for block in blocks.clone() {
                let w = &packed[block * block_len..(block + 1) * block_len];
                // the next block (of this thread's) is fetched into the second-level
                // cache while this one is multiplied: a share of it per group of rows
                let next = if block + 1 < blocks.end {
                    &packed[(block + 1) * block_len..(block + 2) * block_len]
                } else {
                    &[]
                };
                let share = next.len().div_ceil(groups);
                let cols = (n - block * FEATURES).min(FEATURES);
                let bias = bias.map(|b| &b[block * FEATURES..block * FEATURES + cols]);
                for g in 0..groups {
                    let r0 = row0 + g * ROWS;
                    let n_rows = ROWS.min(row0 + block_rows - r0);
                    let xs = &x[r0 * k..(r0 + n_rows) * k];
                    let pf = &next[(g * share).min(next.len())..((g + 1) * share).min(next.len())];
                    let o = &mut out[r0 * width + block * FEATURES - first..];
                    match n_rows {
                        1 => E::group::<1>(w, xs, k, pf, bias, o, width, cols),
                        2 => E::group::<2>(w, xs, k, pf, bias, o, width, cols),
                        3 => E::group::<3>(w, xs, k, pf, bias, o, width, cols),
                        4 => E::group::<4>(w, xs, k, pf, bias, o, width, cols),
                        5 => E::group::<5>(w, xs, k, pf, bias, o, width, cols),
                        6 => E::group::<6>(w, xs, k, pf, bias, o, width, cols),
                        7 => E::group::<7>(w, xs, k, pf, bias, o, width, cols),
                        _ => E::group::<ROWS>(w, xs, k, pf, bias, o, width, cols),
                    }
                }
            }
            row0 += block_rows;
        }
    }

    /// `R` input rows (`xs`, `[R, k]`) times one packed block `w`, written to
    /// `out` (row `r` at `r * width`, the block's first `cols` features, the
    /// others being padding); `prefetch` is fetched into the second-level cache
    /// on the way.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_bf16<const R: usize>(
        w: &[u16],
        xs: &[u16],
        k: usize,
        prefetch: &[u16],
        bias: Option<&[u16]>,
        out: &mut [u16],
        width: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let full_pairs = k / 2;
        let mut prefetch = Prefetch::new(prefetch, full_pairs);
        for pair in 0..full_pairs {
            // SAFETY: the block holds k.div_ceil(2) pairs of 2 * FEATURES elements
            let (w0, w1) = unsafe { (load(w.as_ptr().add(pair * 64)), load(w.as_ptr().add(pair * 64 + 32))) };
            prefetch.step(pair);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row r holds k elements, 2 * pair + 1 < k
                let xv = unsafe { broadcast_pair(xs.as_ptr().add(r * k + 2 * pair)) };
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], w0, xv);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], w1, xv);
            }
        }
        if k % 2 == 1 {
            // the packed block's last pair has a zero second half; the input's
            // lone last element is paired with a zero too
            let pair = full_pairs;
            let (w0, w1) = unsafe { (load(w.as_ptr().add(pair * 64)), load(w.as_ptr().add(pair * 64 + 32))) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let last = u32::from(xs[r * k + k - 1]);
                let xv: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(last as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], w0, xv);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], w1, xv);
            }
        }
        let (b0, b1) = match bias {
            Some(b) => (widen16(b, 0), widen16(b, 16)),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for (r, acc_r) in acc.iter().enumerate() {
            let lo = _mm512_cvtneps_pbh(_mm512_add_ps(acc_r[0], b0));
            let hi = _mm512_cvtneps_pbh(_mm512_add_ps(acc_r[1], b1));
            let dst = &mut out[r * width..];
            let (lo, hi) = (std::mem::transmute::<__m256bh, __m256i>(lo), std::mem::transmute::<__m256bh, __m256i>(hi));
            // SAFETY: the masks keep the stores inside the row's `cols` features
            unsafe {
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().cast(), mask(cols), lo);
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(16).cast(), mask(cols.saturating_sub(16)), hi);
            }
        }
    }

    /// [`group_bf16`] in `f32`: the block holds one inner element of every
    /// feature at a time, multiplied by one input element broadcast to every
    /// lane with fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_f32<const R: usize>(
        w: &[f32],
        xs: &[f32],
        k: usize,
        prefetch: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        width: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut prefetch = Prefetch::new(prefetch, k);
        for i in 0..k {
            // SAFETY: the block holds k groups of FEATURES elements
            let (w0, w1) =
                unsafe { (_mm512_loadu_ps(w.as_ptr().add(i * 32)), _mm512_loadu_ps(w.as_ptr().add(i * 32 + 16))) };
            prefetch.step(i);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(xs[r * k + i]);
                acc_r[0] = _mm512_fmadd_ps(w0, xv, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(w1, xv, acc_r[1]);
            }
        }
        let (b0, b1) = match bias {
            // SAFETY: the masked loads read only the block's `cols` bias values
            Some(b) => unsafe {
                (
                    _mm512_maskz_loadu_ps(mask(cols), b.as_ptr()),
                    _mm512_maskz_loadu_ps(mask(cols.saturating_sub(16)), b.as_ptr().add(16.min(b.len()))),
                )
            },
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = &mut out[r * width..];
            // SAFETY: the masks keep the stores inside the row's `cols` features
            unsafe {
                _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask(cols), _mm512_add_ps(acc_r[0], b0));
                _mm512_mask_storeu_ps(
                    dst.as_mut_ptr().add(16.min(dst.len())),
                    mask(cols.saturating_sub(16)),
                    _mm512_add_ps(acc_r[1], b1),
                );
            }
        }
    }

    /// A slice fetched into the second-level cache a few 64-byte lines at a
    /// time, spread evenly over the `steps` iterations of a loop.
    struct Prefetch {
        base: *const u8,
        lines: usize,
        next: usize,
        steps: usize,
    }

    impl Prefetch {
        fn new<T>(slice: &[T], steps: usize) -> Self {
            let lines = std::mem::size_of_val(slice).div_ceil(64);
            Prefetch { base: slice.as_ptr().cast(), lines, next: 0, steps }
        }

        /// The lines due by the end of iteration `i`.
        #[inline(always)]
        fn step(&mut self, i: usize) {
            while self.next < self.lines && self.next * self.steps < self.lines * (i + 1) {
                // SAFETY: a prefetch never faults; the line starts inside the slice
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.base.wrapping_add(self.next * 64).cast()) };
                self.next += 1;
            }
        }
    }

    /// Up to 16 bias values from `at`, widened to `f32` (zeros past the end).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn widen16(b: &[u16], at: usize) -> __m512 {
        let mut v = [0u16; 16];
        for (d, s) in v.iter_mut().zip(b.iter().skip(at)) {
            *d = *s;
        }
        // SAFETY: v holds 16 elements
        let h = unsafe { _mm256_loadu_si256(v.as_ptr().cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load(p: *const u16) -> __m512bh {
        // SAFETY: the caller guarantees 32 readable elements at p
        let v = unsafe { _mm512_loadu_si512(p.cast()) };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }

    /// The two elements at `p`, repeated in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn broadcast_pair(p: *const u16) -> __m512bh {
        // SAFETY: the caller guarantees two readable elements at p
        let pair = unsafe { p.cast::<i32>().read_unaligned() };
        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values in about [-2, 2] (exact in bfloat16).
    fn values<E: Element>(n: usize, seed: u32) -> Vec<E> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                E::narrow(round_bf16((s % 4001) as f32 / 1000.0 - 2.0).widen())
            })
            .collect()
    }

    /// `f64` sums.
    fn reference<E: Element>(shape: &LinearShape, x: &[E], w: &[E], bias: Option<&[E]>) -> Vec<f64> {
        let (m, k, n) = (shape.rows, shape.in_features, shape.out_features);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|t| f64::from(x[i * k + t].widen()) * f64::from(w[j * k + t].widen())).sum();
                out[i * n + j] = dot + bias.map_or(0.0, |b| f64::from(b[j].widen()));
            }
        }
        out
    }

    fn packed<E: Element>(w: &[E], n: usize, k: usize) -> Vec<E> {
        let mut p = vec![E::default(); packed_len::<E>(n, k)];
        pack(w, n, k, &mut p).unwrap();
        p
    }

    fn check<E: Element>(m: usize, k: usize, n: usize, with_bias: bool, threads: usize) {
        let shape = LinearShape { rows: m, in_features: k, out_features: n };
        let (x, w, b) = (values::<E>(m * k, 1), values::<E>(n * k, 2), values::<E>(n, 3));
        let bias = with_bias.then_some(&b[..]);
        let want = reference(&shape, &x, &w, bias);
        let p = packed(&w, n, k);
        let mut fast = vec![E::default(); m * n];
        linear(&shape, &x, &p, bias, &mut fast, threads).unwrap();
        let mut portable = vec![E::default(); m * n];
        portable_features(&shape, &x, &p, bias, 0..n.div_ceil(FEATURES), &mut portable);
        // one rounding of the sum to the element type, plus f32 summation error
        let rounding = if E::PACK == 2 { 1.0 / 128.0 } else { 1e-6 };
        for (got, name) in [(&fast, "linear"), (&portable, "portable")] {
            for (idx, (g, want)) in got.iter().zip(&want).enumerate() {
                let tol = want.abs() * rounding + 1e-5 * k as f64;
                let g = f64::from(g.widen());
                assert!((g - want).abs() <= tol, "{name} PACK={} m={m} k={k} n={n} [{idx}]: {g} vs {want}", E::PACK);
            }
        }
    }

    fn every_tile_shape<E: Element>() {
        for m in [1, 2, 3, 5, 7, 8, 9, 17] {
            for (k, n) in [(32, 32), (64, 7), (96, 45), (33, 5), (1, 1), (200, 64), (1001, 33)] {
                check::<E>(m, k, n, false, 1);
                check::<E>(m, k, n, true, 1);
            }
        }
    }

    #[test]
    fn matches_f64_sums_on_every_tile_shape() {
        every_tile_shape::<u16>();
        every_tile_shape::<f32>();
    }

    #[test]
    fn many_rows_run_in_blocks() {
        // bfloat16, 1024 features: 128 rows a block, so 130 rows are two blocks,
        // the last of 2 rows; f32, 2048: 32 rows a block
        check::<u16>(130, 1024, 40, true, 1);
        check::<u16>(130, 1024, 40, false, 2);
        check::<f32>(70, 2048, 40, true, 1);
    }

    #[test]
    fn packing_places_packs_of_every_feature_together() {
        let (n, k) = (33, 3);
        let w: Vec<u16> = (0..(n * k) as u16).collect();
        let p = packed(&w, n, k);
        assert_eq!(p.len(), 64 * 4);
        // block 0, pair 0: feature f's elements 0 and 1
        assert_eq!(&p[..4], &[w[0], w[1], w[3], w[4]]);
        // block 0, pair 1: element 2 and the zero padding
        assert_eq!(&p[64..66], &[w[2], 0]);
        // block 1 holds feature 32 then 31 zero features
        assert_eq!(&p[128..130], &[w[96], w[97]]);
        assert!(p[130..192].iter().all(|v| *v == 0));
        let wf: Vec<f32> = w.iter().map(|v| f32::from(*v)).collect();
        let pf = packed(&wf, n, k);
        assert_eq!(pf.len(), 64 * 3);
        assert_eq!(&pf[..3], &[wf[0], wf[3], wf[6]]); // element 0 of features 0, 1, 2
        assert_eq!(pf[32], wf[1]);
    }

    #[test]
    fn threads_split_output_features_exactly() {
        let (m, k, n) = (3, 1024, 2052);
        let shape = LinearShape { rows: m, in_features: k, out_features: n };
        let (x, w) = (values::<u16>(m * k, 4), values::<u16>(n * k, 5));
        let p = packed(&w, n, k);
        let mut one = vec![0u16; m * n];
        linear(&shape, &x, &p, None, &mut one, 1).unwrap();
        for threads in [2, 3, 7] {
            let mut many = vec![0u16; m * n];
            linear(&shape, &x, &p, None, &mut many, threads).unwrap();
            assert_eq!(one, many, "threads={threads}");
        }
        check::<u16>(m, k, n, true, 2);
        check::<f32>(m, k, n, true, 2);
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.0
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(round_bf16(f32::NAN).widen().is_nan());
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn refuses_lengths_that_disagree_with_the_shape() {
        let shape = LinearShape { rows: 2, in_features: 4, out_features: 3 };
        let p = vec![0u16; packed_len::<u16>(3, 4)];
        let mut out = vec![7u16; 6];
        let err = linear(&shape, &[0u16; 8], &p[1..], None, &mut out, 1).unwrap_err();
        assert_eq!(err, LinearError::Length { what: "packed weight", expected: 128, got: 127 });
        assert!(err.to_string().contains("packed weight holds 127"));
        assert!(linear(&shape, &[0u16; 8], &p, Some(&[0; 2]), &mut out, 1).is_err());
        assert_eq!(out, vec![7u16; 6]);
        assert!(pack(&[0u16; 11], 3, 4, &mut [0; 128]).is_err());
        linear(&LinearShape { rows: 0, ..shape }, &[], &p, None, &mut [], 1).unwrap();
    }
}
