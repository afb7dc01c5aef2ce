//! `y = x W^T (+ b)` in bfloat16 for the few rows of a decode step.
//!
//! A decode step multiplies a handful of rows (one per running sequence) by
//! every weight matrix of the model, so it is bound by reading the weights
//! from memory, not by arithmetic. This kernel reads each weight once per
//! call, in the order it is stored (`[out_features, in_features]`, row-major,
//! as torch keeps an `nn.Linear`'s weight, so no repacked copy is needed): a
//! tile of four weight rows stays in the first-level cache while every input
//! row is multiplied by it. On a CPU with AVX512_BF16 the products are
//! `vdpbf16ps` (pairs of bfloat16 multiplied and added into `f32`); elsewhere
//! a portable loop gives the same sums up to their order. Sums are `f32`;
//! the result is rounded once to bfloat16, to nearest, ties to even (as
//! torch rounds).

use std::fmt;
use std::thread;

/// Sizes of one call: `x` is `[rows, in_features]`, the weight
/// `[out_features, in_features]`, the result `[rows, out_features]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// An input [`linear_bf16`] refuses (before reading anything; `out` is left
/// untouched).
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

/// Weight rows of one tile (the input rows of a tile are 1 to [`COLS`]).
const ROWS: usize = 4;
/// Input rows multiplied by one tile of weight rows at a time.
const COLS: usize = 4;
/// Bytes of input rows multiplied by all the weights before the next rows
/// are: they stay in the second-level cache while the weights stream past.
const ROW_BLOCK_BYTES: usize = 256 << 10;
/// Weight elements below which one more thread does not pay for its start
/// (starting one costs tens of microseconds; a core reads ~1M elements in 100).
const MIN_WEIGHTS_PER_THREAD: usize = 1 << 20;

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

/// `out = x weight^T + bias`, every tensor bfloat16 given as its bits,
/// row-major; split over up to `threads` threads (the calling one included)
/// by output feature when the weight is large enough to pay for them.
pub fn linear_bf16(
    shape: &LinearShape,
    x: &[u16],
    weight: &[u16],
    bias: Option<&[u16]>,
    out: &mut [u16],
    threads: usize,
) -> Result<(), LinearError> {
    let LinearShape { rows, in_features: k, out_features: n } = *shape;
    let check = |what, expected: usize, got: usize| {
        if expected == got {
            Ok(())
        } else {
            Err(LinearError::Length { what, expected, got })
        }
    };
    check("x", rows * k, x.len())?;
    check("weight", n * k, weight.len())?;
    if let Some(b) = bias {
        check("bias", n, b.len())?;
    }
    check("out", rows * n, out.len())?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let threads = threads.min(n * k / MIN_WEIGHTS_PER_THREAD).min(n.div_ceil(ROWS)).max(1);
    if threads == 1 {
        features(shape, x, weight, bias, 0..n, out);
        return Ok(());
    }
    // each thread gets whole tiles of output features; its part of the result
    // ([rows, its features]) is copied into place after (a few KB)
    let per_thread = n.div_ceil(ROWS).div_ceil(threads) * ROWS;
    let parts: Vec<(std::ops::Range<usize>, Vec<u16>)> = thread::scope(|scope| {
        let handles: Vec<_> = (1..threads)
            .map(|t| {
                let range = (t * per_thread).min(n)..((t + 1) * per_thread).min(n);
                scope.spawn(move || {
                    let mut part = vec![0u16; rows * range.len()];
                    features(shape, x, weight, bias, range.clone(), &mut part);
                    (range, part)
                })
            })
            .collect();
        let first = 0..per_thread.min(n);
        let mut part = vec![0u16; rows * first.len()];
        features(shape, x, weight, bias, first.clone(), &mut part);
        let mut parts = vec![(first, part)];
        parts.extend(handles.into_iter().map(|h| h.join().expect("a linear kernel thread panicked")));
        parts
    });
    for (range, part) in parts {
        if range.is_empty() {
            continue;
        }
        for (row, src) in part.chunks_exact(range.len()).enumerate() {
            out[row * n + range.start..row * n + range.end].copy_from_slice(src);
        }
    }
    Ok(())
}

/// Output features `range` of every row into `out` (`[rows, range.len()]`).
fn features(
    shape: &LinearShape,
    x: &[u16],
    weight: &[u16],
    bias: Option<&[u16]>,
    range: std::ops::Range<usize>,
    out: &mut [u16],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if linear_bf16_is_fast() {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { avx512::features(shape, x, weight, bias, range, out) };
            return;
        }
    }
    portable_features(shape, x, weight, bias, range, out);
}

/// `f32` value of a bfloat16's bits.
#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
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

/// Stores the sums of one tile: `sums[r][c]` is output feature `first + r` of row `row0 + c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store(
    sums: &[[f32; COLS]; ROWS],
    first: usize,
    n_rows: usize,
    row0: usize,
    n_cols: usize,
    bias: Option<&[u16]>,
    range_start: usize,
    width: usize,
    out: &mut [u16],
) {
    for (r, sums_r) in sums.iter().enumerate().take(n_rows) {
        let feature = first + r;
        let b = bias.map_or(0.0, |b| widen(b[feature]));
        for (c, s) in sums_r.iter().enumerate().take(n_cols) {
            out[(row0 + c) * width + feature - range_start] = round_bf16(s + b);
        }
    }
}

fn portable_features(
    shape: &LinearShape,
    x: &[u16],
    weight: &[u16],
    bias: Option<&[u16]>,
    range: std::ops::Range<usize>,
    out: &mut [u16],
) {
    let k = shape.in_features;
    let width = range.len();
    let mut first = range.start;
    while first < range.end {
        let n_rows = ROWS.min(range.end - first);
        for row0 in (0..shape.rows).step_by(COLS) {
            let n_cols = COLS.min(shape.rows - row0);
            let mut sums = [[0.0f32; COLS]; ROWS];
            for (r, sums_r) in sums.iter_mut().enumerate().take(n_rows) {
                let w = &weight[(first + r) * k..(first + r + 1) * k];
                for (c, s) in sums_r.iter_mut().enumerate().take(n_cols) {
                    let xr = &x[(row0 + c) * k..(row0 + c + 1) * k];
                    *s = w.iter().zip(xr).map(|(a, b)| widen(*a) * widen(*b)).sum();
                }
            }
            store(&sums, first, n_rows, row0, n_cols, bias, range.start, width, out);
        }
        first += ROWS;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{store, LinearShape, COLS, ROWS, ROW_BLOCK_BYTES};

    /// bfloat16 elements in one 512-bit register.
    const LANES: usize = 32;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn features(
        shape: &LinearShape,
        x: &[u16],
        weight: &[u16],
        bias: Option<&[u16]>,
        range: std::ops::Range<usize>,
        out: &mut [u16],
    ) {
        let k = shape.in_features;
        let width = range.len();
        // input rows are taken a block at a time (that stays in the second-level
        // cache): a decode's few rows are one block, a prefill's many are
        // several, and the weights are streamed once per block
        let block = (ROW_BLOCK_BYTES / (2 * k)).max(1).next_multiple_of(COLS);
        let mut acc: Vec<[[__m512; COLS]; ROWS]> = Vec::with_capacity(block.min(shape.rows).div_ceil(COLS));
        let mut block0 = 0;
        while block0 < shape.rows {
            let block_rows = block.min(shape.rows - block0);
            // the next tile's weight rows are fetched into the second-level cache
            // while this one is multiplied, spread evenly over its iterations: the
            // hardware prefetcher alone leaves memory idle while a tile is reused
            // by the second and later groups of input rows
            let iterations = block_rows.div_ceil(COLS) * k.div_ceil(LANES);
            let lines_per_iteration = (ROWS * k * 2).div_ceil(64).div_ceil(iterations);
            let mut first = range.start;
            while first < range.end {
                let n_rows = ROWS.min(range.end - first);
                // a short last tile repeats its last weight row (its sums are dropped)
                let w: [&[u16]; ROWS] = std::array::from_fn(|r| {
                    let f = first + r.min(n_rows - 1);
                    &weight[f * k..(f + 1) * k]
                });
                let next = (first + ROWS).min(range.end) * k..(first + 2 * ROWS).min(range.end) * k;
                let mut prefetch = Prefetch { next: &weight[next], at: 0, per_iteration: lines_per_iteration };
                // every group of input rows multiplied by the tile, which stays in
                // the first-level cache after the first group read it
                let groups = block_rows.div_ceil(COLS);
                acc.clear();
                acc.resize(groups, [[_mm512_setzero_ps(); COLS]; ROWS]);
                for (g, acc_g) in acc.iter_mut().enumerate() {
                    let row0 = block0 + g * COLS;
                    let n_cols = COLS.min(block0 + block_rows - row0);
                    let xs: [&[u16]; COLS] = std::array::from_fn(|c| {
                        let row = row0 + c.min(n_cols - 1);
                        &x[row * k..(row + 1) * k]
                    });
                    let p = &mut prefetch;
                    match n_cols {
                        1 => accumulate::<1>(&w, &xs, 0..k, acc_g, p),
                        2 => accumulate::<2>(&w, &xs, 0..k, acc_g, p),
                        3 => accumulate::<3>(&w, &xs, 0..k, acc_g, p),
                        _ => accumulate::<COLS>(&w, &xs, 0..k, acc_g, p),
                    }
                }
                for (g, acc_g) in acc.iter().enumerate() {
                    let row0 = block0 + g * COLS;
                    let n_cols = COLS.min(block0 + block_rows - row0);
                    store(&sums(acc_g), first, n_rows, row0, n_cols, bias, range.start, width, out);
                }
                first += ROWS;
            }
            block0 += block_rows;
        }
    }

    /// A cursor over the next tile's weights, prefetched a few cache lines
    /// per iteration.
    struct Prefetch<'a> {
        next: &'a [u16],
        at: usize,
        per_iteration: usize,
    }

    impl Prefetch<'_> {
        #[inline(always)]
        fn step(&mut self) {
            for _ in 0..self.per_iteration {
                if self.at >= self.next.len() {
                    return;
                }
                // SAFETY: a prefetch never faults; the address is inside the slice anyway
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.next.as_ptr().add(self.at).cast()) };
                self.at += 32; // one 64-byte line
            }
        }
    }

    /// Adds the products of weight rows `w` with the first `C` input rows `xs`
    /// over `range` of the inner dimension into `acc` (lanes still to be summed).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn accumulate<const C: usize>(
        w: &[&[u16]; ROWS],
        xs: &[&[u16]; COLS],
        range: std::ops::Range<usize>,
        acc: &mut [[__m512; COLS]; ROWS],
        prefetch: &mut Prefetch<'_>,
    ) {
        let mut a: [[__m512; C]; ROWS] = std::array::from_fn(|r| std::array::from_fn(|c| acc[r][c]));
        let full = range.start + (range.end - range.start) / LANES * LANES;
        let mut i = range.start;
        while i < full {
            prefetch.step();
            // SAFETY: i + LANES <= range.end <= the length of every row
            let wv: [__m512bh; ROWS] = std::array::from_fn(|r| unsafe { load(w[r].as_ptr().add(i)) });
            for c in 0..C {
                let xv = unsafe { load(xs[c].as_ptr().add(i)) };
                for r in 0..ROWS {
                    a[r][c] = _mm512_dpbf16_ps(a[r][c], wv[r], xv);
                }
            }
            i += LANES;
        }
        if i < range.end {
            let mask: __mmask32 = (1u32 << (range.end - i)) - 1;
            // SAFETY: the masked load reads only the elements left in the range
            let wv: [__m512bh; ROWS] = std::array::from_fn(|r| unsafe { load_masked(w[r].as_ptr().add(i), mask) });
            for c in 0..C {
                let xv = unsafe { load_masked(xs[c].as_ptr().add(i), mask) };
                for r in 0..ROWS {
                    a[r][c] = _mm512_dpbf16_ps(a[r][c], wv[r], xv);
                }
            }
        }
        for r in 0..ROWS {
            acc[r][..C].copy_from_slice(&a[r]);
        }
    }

    /// The sums of a tile's accumulators, eight at a time transposed in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn sums(acc: &[[__m512; COLS]; ROWS]) -> [[f32; COLS]; ROWS] {
        let mut out = [[0.0f32; COLS]; ROWS];
        for half in 0..ROWS * COLS / 8 {
            let v: [__m512; 8] = std::array::from_fn(|j| {
                let t = 8 * half + j;
                acc[t / COLS][t % COLS]
            });
            let mut lanes = [0.0f32; 8];
            // SAFETY: lanes holds eight floats
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum8(v)) };
            for (j, s) in lanes.iter().enumerate() {
                let t = 8 * half + j;
                out[t / COLS][t % COLS] = *s;
            }
        }
        out
    }

    /// Lane `j` of the result is the sum of `v[j]`'s sixteen lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn sum8(v: [__m512; 8]) -> __m256 {
        let h: [__m256; 8] = std::array::from_fn(|j| {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v[j])));
            _mm256_add_ps(_mm512_castps512_ps256(v[j]), high)
        });
        // each hadd halves the vectors: pairs, then fours, of the eight sums
        let a = [
            _mm256_hadd_ps(h[0], h[1]),
            _mm256_hadd_ps(h[2], h[3]),
            _mm256_hadd_ps(h[4], h[5]),
            _mm256_hadd_ps(h[6], h[7]),
        ];
        let b0 = _mm256_hadd_ps(a[0], a[1]);
        let b1 = _mm256_hadd_ps(a[2], a[3]);
        // b0 holds sums 0-3 as two 128-bit halves to add, b1 sums 4-7
        let low = _mm256_permute2f128_ps::<0x20>(b0, b1);
        let high = _mm256_permute2f128_ps::<0x31>(b0, b1);
        _mm256_add_ps(low, high)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load(p: *const u16) -> __m512bh {
        // SAFETY: the caller guarantees LANES readable elements at p
        let v = unsafe { _mm512_loadu_si512(p.cast()) };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load_masked(p: *const u16, mask: __mmask32) -> __m512bh {
        // SAFETY: the caller guarantees the masked-in elements are readable
        let v = unsafe { _mm512_maskz_loadu_epi16(mask, p.cast()) };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of bfloat16 values in about [-2, 2].
    fn values(n: usize, seed: u32) -> Vec<u16> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                round_bf16((s % 4001) as f32 / 1000.0 - 2.0)
            })
            .collect()
    }

    /// `f64` sums, each rounded once to bfloat16.
    fn reference(shape: &LinearShape, x: &[u16], w: &[u16], bias: Option<&[u16]>) -> Vec<f64> {
        let (m, k, n) = (shape.rows, shape.in_features, shape.out_features);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|t| f64::from(widen(x[i * k + t])) * f64::from(widen(w[j * k + t]))).sum();
                out[i * n + j] = dot + bias.map_or(0.0, |b| f64::from(widen(b[j])));
            }
        }
        out
    }

    fn check(m: usize, k: usize, n: usize, with_bias: bool, threads: usize) {
        let shape = LinearShape { rows: m, in_features: k, out_features: n };
        let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
        let bias = with_bias.then_some(&b[..]);
        let want = reference(&shape, &x, &w, bias);
        let mut fast = vec![0u16; m * n];
        linear_bf16(&shape, &x, &w, bias, &mut fast, threads).unwrap();
        let mut portable = vec![0u16; m * n];
        portable_features(&shape, &x, &w, bias, 0..n, &mut portable);
        for (got, name) in [(&fast, "linear_bf16"), (&portable, "portable")] {
            for (idx, (g, want)) in got.iter().zip(&want).enumerate() {
                // one bfloat16 rounding of the sum, plus f32 summation error
                let tol = want.abs() / 128.0 + 1e-5 * k as f64;
                let g = f64::from(widen(*g));
                assert!((g - want).abs() <= tol, "{name} m={m} k={k} n={n} [{idx}]: {g} vs {want}");
            }
        }
    }

    #[test]
    fn matches_f64_sums_on_every_tile_shape() {
        for m in [1, 2, 3, 4, 5, 8, 9] {
            for (k, n) in [(32, 4), (64, 7), (96, 13), (33, 5), (1, 1), (200, 9), (1000, 7)] {
                check(m, k, n, false, 1);
                check(m, k, n, true, 1);
            }
        }
    }

    #[test]
    fn many_rows_run_in_blocks() {
        // 1024 features: 128 rows a block, so 130 rows are two blocks, the last of 2 rows
        check(130, 1024, 9, true, 1);
        check(130, 1024, 9, false, 2);
    }

    #[test]
    fn threads_split_output_features_exactly() {
        let (m, k, n) = (3, 1024, 2052);
        let shape = LinearShape { rows: m, in_features: k, out_features: n };
        let (x, w) = (values(m * k, 4), values(n * k, 5));
        let mut one = vec![0u16; m * n];
        linear_bf16(&shape, &x, &w, None, &mut one, 1).unwrap();
        for threads in [2, 3, 7] {
            let mut many = vec![0u16; m * n];
            linear_bf16(&shape, &x, &w, None, &mut many, threads).unwrap();
            assert_eq!(one, many, "threads={threads}");
        }
        check(m, k, n, true, 2);
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.0
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(widen(round_bf16(f32::NAN)).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn refuses_lengths_that_disagree_with_the_shape() {
        let shape = LinearShape { rows: 2, in_features: 4, out_features: 3 };
        let mut out = vec![7u16; 6];
        let err = linear_bf16(&shape, &[0; 8], &[0; 11], None, &mut out, 1).unwrap_err();
        assert_eq!(err, LinearError::Length { what: "weight", expected: 12, got: 11 });
        assert!(err.to_string().contains("weight holds 11"));
        assert!(linear_bf16(&shape, &[0; 8], &[0; 12], Some(&[0; 2]), &mut out, 1).is_err());
        assert_eq!(out, vec![7u16; 6]);
        linear_bf16(&LinearShape { rows: 0, ..shape }, &[], &[0; 12], None, &mut [], 1).unwrap();
    }
}
