//! Root-mean-square normalization of rows, as FMS's `LayerNormParameterized`
//! computes it without re-centering (Granite, Llama): in `f32`,
//! `x / sqrt(mean(x²) + eps)`, rounded to the element type, then times the
//! weight (rounded) and plus the bias (rounded), each step rounded as torch
//! rounds it. One pass over a row instead of the eight tensor ops (and their
//! temporaries) torch runs for it; the sum of squares is taken in another
//! order than torch's, so results can differ from FMS's by the rounding of
//! that sum.

use std::fmt;

use crate::linear::Element;

/// An input [`rms_norm`] refuses (before writing anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NormError {
    /// A buffer's length disagrees with the row size.
    Length { what: &'static str, expected: usize, got: usize },
}

impl fmt::Display for NormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { what, expected, got } => {
                write!(f, "rms norm: {what} holds {got} elements, {expected} expected")
            }
        }
    }
}

impl std::error::Error for NormError {}

/// `out = norm(x) * weight + bias` over rows of `dim` elements (`x` and `out`
/// hold whole rows; `weight` and `bias`, if given, one row each).
pub fn rms_norm<E: Element>(
    x: &[E],
    dim: usize,
    weight: Option<&[E]>,
    bias: Option<&[E]>,
    eps: f32,
    out: &mut [E],
) -> Result<(), NormError> {
    let rows = rms_norm_checks(x.len(), dim, weight, bias, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { rows_avx512(x, dim, weight, bias, eps, out) };
            return Ok(());
        }
    }
    norm_rows(x, dim, weight, bias, eps, out);
    Ok(())
}

/// A residual connection followed by the next norm, as FMS's blocks compute
/// them: `h = delta * multiplier + h` (or `delta + h` without a multiplier),
/// the product and the sum each rounded to the element type as torch's two
/// ops round them; then `out = rms_norm(h)` as [`rms_norm`]. `h` is updated
/// in place (the residual stream); `delta`, `h` and `out` hold whole rows.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm<E: Element>(
    delta: &[E],
    multiplier: Option<f32>,
    h: &mut [E],
    dim: usize,
    weight: Option<&[E]>,
    bias: Option<&[E]>,
    eps: f32,
    out: &mut [E],
) -> Result<(), NormError> {
    if delta.len() != h.len() {
        return Err(NormError::Length { what: "delta", expected: h.len(), got: delta.len() });
    }
    // checked before h is written
    rms_norm_checks(h.len(), dim, weight, bias, out.len())?;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { add_avx512(delta, multiplier, h) };
            return rms_norm(h, dim, weight, bias, eps, out);
        }
    }
    add(delta, multiplier, h);
    rms_norm(h, dim, weight, bias, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_avx512<E: Element>(delta: &[E], multiplier: Option<f32>, h: &mut [E]) {
    add(delta, multiplier, h);
}

#[inline(always)]
fn add<E: Element>(delta: &[E], multiplier: Option<f32>, h: &mut [E]) {
    match multiplier {
        Some(m) => {
            for (h, d) in h.iter_mut().zip(delta) {
                *h = E::narrow(E::narrow(d.widen() * m).widen() + h.widen());
            }
        }
        None => {
            for (h, d) in h.iter_mut().zip(delta) {
                *h = E::narrow(d.widen() + h.widen());
            }
        }
    }
}

fn rms_norm_checks<E>(
    len: usize,
    dim: usize,
    weight: Option<&[E]>,
    bias: Option<&[E]>,
    out_len: usize,
) -> Result<usize, NormError> {
    let rows = len.checked_div(dim).unwrap_or(0);
    let check =
        |what, expected, got| if expected == got { Ok(()) } else { Err(NormError::Length { what, expected, got }) };
    check("x", rows * dim, len)?;
    check("out", len, out_len)?;
    if let Some(w) = weight {
        check("weight", dim, w.len())?;
    }
    if let Some(b) = bias {
        check("bias", dim, b.len())?;
    }
    Ok(rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512<E: Element>(
    x: &[E],
    dim: usize,
    weight: Option<&[E]>,
    bias: Option<&[E]>,
    eps: f32,
    out: &mut [E],
) {
    norm_rows(x, dim, weight, bias, eps, out);
}

/// Independent partial sums of squares (one 16-lane register).
const LANES: usize = 16;

#[inline(always)]
fn norm_rows<E: Element>(x: &[E], dim: usize, weight: Option<&[E]>, bias: Option<&[E]>, eps: f32, out: &mut [E]) {
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let v = c[i].widen();
                acc[i] += v * v;
            }
        }
        let mut sum: f32 = chunks.remainder().iter().map(|v| v.widen() * v.widen()).sum();
        sum += acc.iter().sum::<f32>();
        let r = 1.0 / (sum / dim as f32 + eps).sqrt();
        for (d, v) in dst.iter_mut().zip(row) {
            *d = E::narrow(v.widen() * r);
        }
        if let Some(w) = weight {
            for (d, w) in dst.iter_mut().zip(w) {
                *d = E::narrow(w.widen() * d.widen());
            }
        }
        if let Some(b) = bias {
            for (d, b) in dst.iter_mut().zip(b) {
                *d = E::narrow(d.widen() + b.widen());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::round_bf16;

    fn reference(row: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        row.iter().zip(w).map(|(v, w)| v / (ms + eps).sqrt() * w).collect()
    }

    #[test]
    fn rows_are_normalized_and_scaled() {
        let dim = 77; // not a multiple of the lanes
        let x: Vec<f32> = (0..3 * dim).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 / 10.0).collect();
        let b: Vec<f32> = (0..dim).map(|i| (i % 5) as f32 / 100.0).collect();
        let mut out = vec![0.0f32; 3 * dim];
        rms_norm(&x, dim, Some(&w), Some(&b), 1e-5, &mut out).unwrap();
        let mut portable = vec![0.0f32; 3 * dim];
        norm_rows(&x, dim, Some(&w), Some(&b), 1e-5, &mut portable);
        for r in 0..3 {
            let row: Vec<f64> = x[r * dim..(r + 1) * dim].iter().map(|v| f64::from(*v)).collect();
            let want = reference(&row, &w.iter().map(|v| f64::from(*v)).collect::<Vec<_>>(), 1e-5);
            for i in 0..dim {
                let got = f64::from(out[r * dim + i]);
                assert!((got - want[i] - f64::from(b[i])).abs() < 1e-5, "row {r} [{i}]: {got} vs {}", want[i]);
                assert!((out[r * dim + i] - portable[r * dim + i]).abs() < 1e-6);
            }
        }
        // bfloat16: each step rounded, as torch rounds
        let xb: Vec<u16> = x.iter().map(|v| round_bf16(*v)).collect();
        let wb: Vec<u16> = w.iter().map(|v| round_bf16(*v)).collect();
        let mut ob = vec![0u16; 3 * dim];
        rms_norm(&xb, dim, Some(&wb), None, 1e-5, &mut ob).unwrap();
        for r in 0..3 {
            let row: Vec<f64> = xb[r * dim..(r + 1) * dim].iter().map(|v| f64::from(v.widen())).collect();
            let want = reference(&row, &wb.iter().map(|v| f64::from(v.widen())).collect::<Vec<_>>(), 1e-5);
            for i in 0..dim {
                let got = f64::from(ob[r * dim + i].widen());
                assert!((got - want[i]).abs() <= want[i].abs() * 2.0f64.powi(-7) + 1e-6, "{got} vs {}", want[i]);
            }
        }
    }

    #[test]
    fn residual_then_norm_rounds_as_torch() {
        let dim = 37;
        let x: Vec<u16> = (0..2 * dim).map(|i| round_bf16(((i * 29 % 67) as f32 - 33.0) / 9.0)).collect();
        let delta: Vec<u16> = (0..2 * dim).map(|i| round_bf16(((i * 13 % 53) as f32 - 26.0) / 7.0)).collect();
        let w: Vec<u16> = (0..dim).map(|i| round_bf16(0.5 + (i % 7) as f32 / 10.0)).collect();
        for m in [Some(0.22f32), None] {
            let mut h = x.clone();
            let mut out = vec![0u16; 2 * dim];
            add_rms_norm(&delta, m, &mut h, dim, Some(&w), None, 1e-5, &mut out).unwrap();
            // torch: (delta * m) rounded, plus h, rounded; then the norm of the sum
            let want: Vec<u16> = x
                .iter()
                .zip(&delta)
                .map(|(x, d)| {
                    let scaled = m.map_or(d.widen(), |m| round_bf16(d.widen() * m).widen());
                    round_bf16(scaled + x.widen())
                })
                .collect();
            assert_eq!(h, want, "multiplier {m:?}");
            let mut normed = vec![0u16; 2 * dim];
            rms_norm(&want, dim, Some(&w), None, 1e-5, &mut normed).unwrap();
            assert_eq!(out, normed);
        }
        let mut h = x.clone();
        let err = add_rms_norm(&delta[1..], None, &mut h, dim, None, None, 1e-5, &mut [0u16; 74]).unwrap_err();
        assert_eq!(err, NormError::Length { what: "delta", expected: 74, got: 73 });
        let err = add_rms_norm(&delta, None, &mut h, dim, Some(&w[1..]), None, 1e-5, &mut [0u16; 74]).unwrap_err();
        assert!(err.to_string().contains("weight holds 36 elements"), "{err}");
        assert_eq!(h, x, "nothing written when refused");
    }

    #[test]
    fn refuses_lengths_that_disagree() {
        let mut out = vec![0.0f32; 8];
        let err = rms_norm(&[0.0f32; 8], 3, None, None, 1e-5, &mut out).unwrap_err();
        assert_eq!(err, NormError::Length { what: "x", expected: 6, got: 8 });
        let err = rms_norm(&[0.0f32; 8], 4, Some(&[1.0; 3]), None, 1e-5, &mut out).unwrap_err();
        assert!(err.to_string().contains("weight holds 3 elements, 4 expected"), "{err}");
    }
}
