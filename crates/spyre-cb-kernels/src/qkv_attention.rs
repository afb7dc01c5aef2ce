//! A decode step's attention from the fused QKV product of its tokens, in
//! one call: the query and key heads rotated ([`crate::rope`]), the new key
//! and value stored in the paged cache at each token's slot, the attention
//! over each sequence's cached context ([`paged_decode`]), the result rounded
//! to the element type. The same roundings as FMS's separate steps (rotated
//! heads rounded to the element type before the query is widened and the key
//! stored; the float32 attention rounded once at the end), so the results
//! are bit-identical to them; what goes is about ten tensor ops a layer.

use crate::attention::{check_len, checked_mul as mul, paged_decode, validate, DecodeInputs, DecodeShape, KernelError};
use crate::linear::Element;
use crate::math::CacheElem;
use crate::rope::rotate_rows;

/// The per-token inputs of [`paged_decode_qkv`] besides the cache.
#[derive(Clone, Copy, Debug)]
pub struct QkvInputs<'a, E> {
    /// `[batch, (n_heads + kv_heads) * head_dim + kv_heads * value_dim]`: each
    /// token's query heads, key heads and value heads, as a fused QKV product
    /// lays them out.
    pub qkv: &'a [E],
    /// `[batch, head_dim / 2]` each: the cosines, negated sines and sines of
    /// each token's rotary angles.
    pub cos: &'a [f32],
    pub neg_sin: &'a [f32],
    pub sin: &'a [f32],
    /// `[batch]`: the cache slot (`block * block_size + offset`) each token's
    /// key and value are stored in.
    pub slots: &'a [i64],
    /// `[batch, table_width]` physical block ids.
    pub block_table: &'a [i64],
    /// `[batch]`: first attended in-table position (the left padding).
    pub context_start: &'a [i64],
    /// `[batch]`: one past the last attended position (the token's own).
    pub context_end: &'a [i64],
    /// Multiplies `q . k` before the softmax.
    pub scale: f32,
}

/// Rotates, stores and attends (see the module's text); `out` is `[batch,
/// n_heads * value_dim]`. Everything is checked before the cache is
/// written: a refused call changes nothing.
pub fn paged_decode_qkv<E: Element + CacheElem>(
    shape: &DecodeShape,
    inputs: &QkvInputs<'_, E>,
    key_cache: &mut [E],
    value_cache: &mut [E],
    out: &mut [E],
    threads: usize,
) -> Result<(), KernelError> {
    let DecodeShape { batch, n_heads, kv_heads, head_dim, value_dim, n_blocks, block_size, .. } = *shape;
    let overflow = || KernelError::Shape("sizes overflow".into());
    let rotated = mul(n_heads.checked_add(kv_heads).ok_or_else(overflow)?, head_dim)?;
    let row = rotated.checked_add(mul(kv_heads, value_dim)?).ok_or_else(overflow)?;
    if !head_dim.is_multiple_of(2) {
        return Err(KernelError::Shape(format!("the head size {head_dim} must be even to be rotated")));
    }
    check_len("qkv", mul(batch, row)?, inputs.qkv.len())?;
    for (what, table) in [("cos", inputs.cos), ("neg_sin", inputs.neg_sin), ("sin", inputs.sin)] {
        check_len(what, mul(batch, head_dim / 2)?, table.len())?;
    }
    check_len("slots", batch, inputs.slots.len())?;
    // as long as qkv, which exists: no overflow past here
    let mut query = vec![0.0f32; batch * n_heads * head_dim];
    validate(shape, &attention(inputs, &query, key_cache, value_cache), out.len())?;
    let n_slots = n_blocks * block_size;
    if let Some((seq, &slot)) = inputs.slots.iter().enumerate().find(|(_, &s)| s < 0 || s as u64 >= n_slots as u64) {
        return Err(KernelError::Shape(format!(
            "token {seq} is stored in slot {slot}, outside the cache's {n_slots} slots"
        )));
    }
    if batch == 0 {
        return Ok(());
    }
    let half = head_dim / 2;
    let mut heads = vec![E::default(); rotated];
    for (t, qkv) in inputs.qkv.chunks_exact(row).enumerate() {
        let angles = t * half..(t + 1) * half;
        rotate_rows(
            n_heads + kv_heads,
            head_dim,
            &qkv[..rotated],
            &inputs.cos[angles.clone()],
            &inputs.neg_sin[angles.clone()],
            &inputs.sin[angles],
            &mut heads,
        );
        let (q, k) = heads.split_at(n_heads * head_dim);
        for (dst, src) in query[t * n_heads * head_dim..(t + 1) * n_heads * head_dim].iter_mut().zip(q) {
            *dst = src.widen();
        }
        let slot = inputs.slots[t] as usize;
        key_cache[slot * kv_heads * head_dim..(slot + 1) * kv_heads * head_dim].copy_from_slice(k);
        value_cache[slot * kv_heads * value_dim..(slot + 1) * kv_heads * value_dim].copy_from_slice(&qkv[rotated..]);
    }
    let mut sums = vec![0.0f32; out.len()];
    paged_decode(shape, &attention(inputs, &query, key_cache, value_cache), &mut sums, threads)?;
    for (o, s) in out.iter_mut().zip(&sums) {
        *o = E::narrow(*s);
    }
    Ok(())
}

/// The attention's inputs: `inputs`' context with this query and cache.
fn attention<'a, E>(
    inputs: &QkvInputs<'a, E>,
    query: &'a [f32],
    key_cache: &'a [E],
    value_cache: &'a [E],
) -> DecodeInputs<'a, E> {
    DecodeInputs {
        query,
        key_cache,
        value_cache,
        block_table: inputs.block_table,
        context_start: inputs.context_start,
        context_end: inputs.context_end,
        scale: inputs.scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::round_bf16;
    use crate::rope::{rope, RopeShape};

    /// The separate steps, as FMS runs them: rotate, round, store, widen the query, attend, round.
    fn separate(shape: &DecodeShape, x: &QkvInputs<'_, u16>, kc: &mut [u16], vc: &mut [u16]) -> Vec<u16> {
        let (h, kvh, d, dv) = (shape.n_heads, shape.kv_heads, shape.head_dim, shape.value_dim);
        let row = (h + kvh) * d + kvh * dv;
        let qk: Vec<u16> = x.qkv.chunks(row).flat_map(|r| r[..(h + kvh) * d].to_vec()).collect();
        let mut rotated = vec![0u16; qk.len()];
        let rs = RopeShape { rows: shape.batch, heads: h + kvh, head_dim: d };
        rope(&rs, &qk, x.cos, x.neg_sin, x.sin, &mut rotated).unwrap();
        let mut query = vec![];
        for (t, r) in rotated.chunks(qk.len() / shape.batch).enumerate() {
            query.extend(r[..h * d].iter().map(|v| v.widen()));
            let slot = x.slots[t] as usize;
            kc[slot * kvh * d..(slot + 1) * kvh * d].copy_from_slice(&r[h * d..]);
            vc[slot * kvh * dv..(slot + 1) * kvh * dv].copy_from_slice(&x.qkv[t * row + (h + kvh) * d..(t + 1) * row]);
        }
        let inputs = DecodeInputs {
            query: &query,
            key_cache: kc,
            value_cache: vc,
            block_table: x.block_table,
            context_start: x.context_start,
            context_end: x.context_end,
            scale: x.scale,
        };
        let mut out = vec![0.0f32; shape.batch * h * dv];
        paged_decode(shape, &inputs, &mut out, 1).unwrap();
        out.iter().map(|v| round_bf16(*v)).collect()
    }

    #[test]
    fn matches_the_separate_steps_bit_for_bit() {
        let shape = DecodeShape {
            batch: 3,
            n_heads: 4,
            kv_heads: 2,
            head_dim: 64,
            value_dim: 64,
            n_blocks: 6,
            block_size: 4,
            table_width: 2,
        };
        let row = (4 + 2) * 64 + 2 * 64;
        let qkv: Vec<u16> = (0..3 * row).map(|i| round_bf16(((i * 37 % 101) as f32 - 50.0) / 31.0)).collect();
        let angles: Vec<f32> = (0..3 * 32).map(|i| i as f32 * 0.37).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let neg_sin: Vec<f32> = sin.iter().map(|s| -s).collect();
        let cache: Vec<u16> = (0..6 * 4 * 2 * 64).map(|i| round_bf16(((i * 13 % 29) as f32 - 14.0) / 9.0)).collect();
        let inputs = QkvInputs {
            qkv: &qkv,
            cos: &cos,
            neg_sin: &neg_sin,
            sin: &sin,
            // sequence 0 at position 5 of blocks [2, 0], 1 at position 2 of [4, 5], 2 at 7 of [1, 3]
            slots: &[5, 4 * 4 + 2, 3 * 4 + 3],
            block_table: &[2, 0, 4, 5, 1, 3],
            context_start: &[1, 0, 2],
            context_end: &[6, 3, 8],
            scale: 0.125,
        };
        let (mut kc, mut vc) = (cache.clone(), cache.clone());
        let want = separate(&shape, &inputs, &mut kc, &mut vc);
        let (mut kc2, mut vc2) = (cache.clone(), cache.clone());
        let mut out = vec![0u16; 3 * 4 * 64];
        paged_decode_qkv(&shape, &inputs, &mut kc2, &mut vc2, &mut out, 2).unwrap();
        assert_eq!(out, want);
        assert_eq!((kc2, vc2), (kc, vc));
        // a slot outside the cache is refused before anything is written
        let bad = QkvInputs { slots: &[5, 99, 1], ..inputs };
        let (mut kc3, mut vc3) = (cache.clone(), cache.clone());
        let err = paged_decode_qkv(&shape, &bad, &mut kc3, &mut vc3, &mut out, 1).unwrap_err();
        assert!(err.to_string().contains("token 1 is stored in slot 99, outside the cache's 24 slots"), "{err}");
        assert_eq!((&kc3, &vc3), (&cache, &cache));
        let short = QkvInputs { qkv: &qkv[1..], ..inputs };
        let err = paged_decode_qkv(&shape, &short, &mut kc3, &mut vc3, &mut out, 1).unwrap_err();
        assert_eq!(err, KernelError::Length { what: "qkv", expected: 3 * row, got: 3 * row - 1 });
    }
}
