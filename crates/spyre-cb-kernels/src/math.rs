//! Small vector loops written so that the compiler vectorizes them (several
//! independent accumulators, no data-dependent branches). They are
//! `#[inline(always)]` so that a caller compiled for a wider instruction set
//! (see `attention::run`) gets them in that instruction set too.

/// Independent partial sums: enough to fill two 8-lane registers.
const LANES: usize = 16;

/// An element of the KV cache: read as `f32` (the kernel computes in `f32`).
pub trait CacheElem: Copy + Send + Sync + 'static {
    fn f32(self) -> f32;
    /// The elements as bfloat16 bits, if they are bfloat16.
    fn bf16_bits(elements: &[Self]) -> Option<&[u16]>;
    /// The 16 elements at `p`, as `f32`.
    ///
    /// # Safety
    /// The CPU has AVX-512F (and AVX-512BW for bfloat16); `p` points at 16 elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl CacheElem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    fn bf16_bits(_: &[Self]) -> Option<&[u16]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

/// A bfloat16 cache element, as its 16 bits (torch's `bfloat16` storage viewed as
/// `uint16`): the high half of the `f32` with the same value, so reading one is
/// a shift.
impl CacheElem for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
    fn bf16_bits(elements: &[Self]) -> Option<&[u16]> {
        Some(elements)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract
        let bits = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}

/// The first `n` of sixteen lanes (all of them from 16 on).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn mask(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// `Σ a[i] * b[i]`; `a` and `b` have the same length.
#[inline(always)]
pub(crate) fn dot<E: CacheElem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i].f32();
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y.f32();
    }
    // pairwise, so that the result does not depend on the vector width
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `y += alpha * x`.
#[inline(always)]
pub(crate) fn axpy<E: CacheElem>(y: &mut [f32], alpha: f32, x: &[E]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi.f32();
    }
}

/// `y *= alpha`.
#[inline(always)]
pub(crate) fn scale(y: &mut [f32], alpha: f32) {
    for yi in y.iter_mut() {
        *yi *= alpha;
    }
}

/// The largest element (`-inf` for an empty slice).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(chunks.remainder()) {
        m = m.max(*v);
    }
    m
}

/// Replaces every `x` by `exp(x - shift)` and returns their sum.
#[inline(always)]
pub(crate) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), within about
/// 2 ulp, branch-free: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6
/// polynomial for `e^r` and `2^n` built in the exponent bits (the classic
/// Cephes `expf` reduction). Inputs below -87 give ~0 rather than denormals.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    er * two_n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let b: Vec<f32> = (0..67).map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-4);
        assert_eq!(max(&a), a.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut e = a.clone();
        let s = exp_shifted_sum(&mut e, 1.0);
        let want: f64 = a.iter().map(|x| (f64::from(*x) - 1.0).exp()).sum();
        assert!((f64::from(s) - want).abs() < 1e-4 * want);
        for (got, x) in e.iter().zip(&a) {
            assert!((f64::from(*got) - (f64::from(*x) - 1.0).exp()).abs() < 1e-6);
        }
    }
}
