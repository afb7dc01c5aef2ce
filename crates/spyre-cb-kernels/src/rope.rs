//! Rotary position embedding of query or key heads, as FMS computes it:
//! each (even, odd) pair of a head rotated by its position's angle,
//! `(c x0 - s x1, s x0 + c x1)` in `f32` with each product and each sum
//! rounded (no fused multiply-add), then rounded to the element type — the
//! roundings of torch's separate multiply and add, so the results are
//! bit-identical to FMS's. One pass instead of about ten tensor ops.

use std::fmt;

use crate::linear::Element;

/// An input [`rope`] refuses (before writing anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RopeError {
    /// A buffer's length disagrees with the shape, or the head size is odd.
    Shape(String),
}

impl fmt::Display for RopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape(msg) => write!(f, "rotary embedding: {msg}"),
        }
    }
}

impl std::error::Error for RopeError {}

/// Sizes of one call: `x` and `out` are `[rows, heads, head_dim]`, each angle
/// table `[rows, head_dim / 2]` (one row per token: its position's angles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// `out` = `x` with every head's pairs rotated: `cos`, `neg_sin` and `sin`
/// are the cosines, negated sines and sines of each row's angles (FMS caches
/// the three).
pub fn rope<E: Element>(
    shape: &RopeShape,
    x: &[E],
    cos: &[f32],
    neg_sin: &[f32],
    sin: &[f32],
    out: &mut [E],
) -> Result<(), RopeError> {
    let RopeShape { rows, heads, head_dim } = *shape;
    if !head_dim.is_multiple_of(2) {
        return Err(RopeError::Shape(format!("the head size {head_dim} must be even")));
    }
    let check = |what: &str, expected: usize, got: usize| {
        if expected == got {
            Ok(())
        } else {
            Err(RopeError::Shape(format!("{what} holds {got} elements, the shape needs {expected}")))
        }
    };
    check("x", rows * heads * head_dim, x.len())?;
    check("out", x.len(), out.len())?;
    for (what, table) in [("cos", cos), ("neg_sin", neg_sin), ("sin", sin)] {
        check(what, rows * head_dim / 2, table.len())?;
    }
    if rows == 0 || heads == 0 || head_dim == 0 {
        return Ok(());
    }
    rotate_rows(heads, head_dim, x, cos, neg_sin, sin, out);
    Ok(())
}

/// [`rope`] without its checks (the caller's sizes agree; `heads` and
/// `head_dim` are positive), in the widest instruction set this CPU has.
pub(crate) fn rotate_rows<E: Element>(
    heads: usize,
    head_dim: usize,
    x: &[E],
    cos: &[f32],
    neg_sin: &[f32],
    sin: &[f32],
    out: &mut [E],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { rotate_avx512(heads, head_dim, x, cos, neg_sin, sin, out) };
            return;
        }
    }
    rotate(heads, head_dim, x, cos, neg_sin, sin, out);
}

/// [`rotate`] compiled for AVX-512 (the compiler vectorizes the pairs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rotate_avx512<E: Element>(
    heads: usize,
    head_dim: usize,
    x: &[E],
    cos: &[f32],
    neg_sin: &[f32],
    sin: &[f32],
    out: &mut [E],
) {
    rotate(heads, head_dim, x, cos, neg_sin, sin, out);
}

#[inline(always)]
fn rotate<E: Element>(
    heads: usize,
    head_dim: usize,
    x: &[E],
    cos: &[f32],
    neg_sin: &[f32],
    sin: &[f32],
    out: &mut [E],
) {
    let half = head_dim / 2;
    let tables = cos.chunks_exact(half).zip(neg_sin.chunks_exact(half)).zip(sin.chunks_exact(half));
    for ((xr, or), ((c, ns), s)) in
        x.chunks_exact(heads * head_dim).zip(out.chunks_exact_mut(heads * head_dim)).zip(tables)
    {
        for (xh, oh) in xr.chunks_exact(head_dim).zip(or.chunks_exact_mut(head_dim)) {
            let angles = c.iter().zip(ns).zip(s);
            for ((pair, o), ((&c, &ns), &s)) in xh.chunks_exact(2).zip(oh.chunks_exact_mut(2)).zip(angles) {
                let (x0, x1) = (pair[0].widen(), pair[1].widen());
                o[0] = E::narrow(c * x0 + ns * x1);
                o[1] = E::narrow(s * x0 + c * x1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_rotated_by_their_rows_angles() {
        let shape = RopeShape { rows: 2, heads: 3, head_dim: 4 };
        let x: Vec<f32> = (0..24).map(|i| i as f32 / 7.0 - 1.0).collect();
        let angles = [0.0f32, 0.5, 1.0, 2.0];
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let neg_sin: Vec<f32> = sin.iter().map(|s| -s).collect();
        let mut out = vec![0.0f32; 24];
        rope(&shape, &x, &cos, &neg_sin, &sin, &mut out).unwrap();
        for r in 0..2 {
            for h in 0..3 {
                for i in 0..2 {
                    let k = r * 12 + h * 4 + 2 * i;
                    let a = angles[r * 2 + i];
                    let (x0, x1) = (x[k], x[k + 1]);
                    assert!((out[k] - (a.cos() * x0 - a.sin() * x1)).abs() < 1e-6);
                    assert!((out[k + 1] - (a.sin() * x0 + a.cos() * x1)).abs() < 1e-6);
                }
            }
        }
        // the first angle is 0: that pair is unchanged
        assert_eq!((out[0], out[1]), (x[0], x[1]));
        let err = rope(&shape, &x, &cos[..3], &neg_sin, &sin, &mut out).unwrap_err();
        assert!(err.to_string().contains("cos holds 3 elements, the shape needs 4"), "{err}");
        let odd = RopeShape { rows: 1, heads: 1, head_dim: 3 };
        assert!(rope(&odd, &x[..3], &[], &[], &[], &mut out[..3]).is_err());
    }
}
