//! `paged_decode` against a plain f64 attention over gathered keys, on random
//! shapes, paddings, block tables and thread counts; and its refusals.

use proptest::prelude::*;
use spyre_cb_kernels::{paged_decode, DecodeInputs, DecodeShape, KernelError};

struct Case {
    shape: DecodeShape,
    query: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    table: Vec<i64>,
    start: Vec<i64>,
    end: Vec<i64>,
    scale: f32,
}

impl Case {
    fn inputs(&self) -> DecodeInputs<'_> {
        DecodeInputs {
            query: &self.query,
            key_cache: &self.keys,
            value_cache: &self.values,
            block_table: &self.table,
            context_start: &self.start,
            context_end: &self.end,
            scale: self.scale,
        }
    }

    /// Gather the range's keys through the table, softmax, weighted values.
    fn reference(&self) -> Vec<f64> {
        let s = &self.shape;
        let group = s.n_heads / s.kv_heads;
        let mut out = vec![0.0; s.batch * s.n_heads * s.value_dim];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                let kv = h / group;
                let q = &self.query[(b * s.n_heads + h) * s.head_dim..][..s.head_dim];
                let positions: Vec<usize> = (self.start[b] as usize..self.end[b] as usize).collect();
                let slot = |j: usize| {
                    self.table[b * s.table_width + j / s.block_size] as usize * s.block_size + j % s.block_size
                };
                let logits: Vec<f64> = positions
                    .iter()
                    .map(|&j| {
                        let k = &self.keys[(slot(j) * s.kv_heads + kv) * s.head_dim..][..s.head_dim];
                        q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * f64::from(self.scale)
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = p.iter().sum();
                let o = &mut out[(b * s.n_heads + h) * s.value_dim..][..s.value_dim];
                for (&j, pj) in positions.iter().zip(&p) {
                    let v = &self.values[(slot(j) * s.kv_heads + kv) * s.value_dim..][..s.value_dim];
                    for (oi, vi) in o.iter_mut().zip(v) {
                        *oi += pj / z * f64::from(*vi);
                    }
                }
            }
        }
        out
    }
}

/// A deterministic value stream in [-2, 2).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn case(
    seed: u64,
    batch: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    block_size: usize,
    table_width: usize,
    n_blocks: usize,
    ranges: &[(i64, i64)],
) -> Case {
    let shape = DecodeShape {
        batch,
        n_heads: kv_heads * group,
        kv_heads,
        head_dim,
        value_dim: head_dim,
        n_blocks,
        block_size,
        table_width,
    };
    let slots = n_blocks * block_size * kv_heads * head_dim;
    // every table entry a block of the cache (rows may share blocks, as
    // padding and prefix-cached blocks do)
    let table = values(seed ^ 7, batch * table_width)
        .iter()
        .map(|v| (((v + 2.0) / 4.0 * n_blocks as f32) as i64).min(n_blocks as i64 - 1))
        .collect();
    Case {
        shape,
        query: values(seed, batch * shape.n_heads * head_dim),
        keys: values(seed ^ 1, slots),
        values: values(seed ^ 2, slots),
        table,
        start: ranges.iter().map(|r| r.0).collect(),
        end: ranges.iter().map(|r| r.1).collect(),
        scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

fn run(c: &Case, threads: usize) -> Result<Vec<f32>, KernelError> {
    let mut out = vec![f32::NAN; c.shape.batch * c.shape.n_heads * c.shape.value_dim];
    paged_decode(&c.shape, &c.inputs(), &mut out, threads)?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn matches_reference(
        seed in any::<u64>(),
        batch in 1usize..6,
        kv_heads in 1usize..4,
        group in 1usize..4,
        head_dim in prop::sample::select(vec![1usize, 3, 16, 64, 80]),
        block_size in prop::sample::select(vec![1usize, 4, 64]),
        table_width in 1usize..5,
        n_blocks in 1usize..12,
        threads in 1usize..4,
        fractions in prop::collection::vec((0.0f64..1.0, 0.0f64..1.0), 6),
    ) {
        let limit = (table_width * block_size) as i64;
        let ranges: Vec<(i64, i64)> = fractions[..batch]
            .iter()
            .map(|&(a, b)| {
                let end = 1 + ((limit - 1) as f64 * b) as i64;
                let start = ((end - 1) as f64 * a) as i64;
                (start, end)
            })
            .collect();
        let c = case(seed, batch, kv_heads, group, head_dim, block_size, table_width, n_blocks, &ranges);
        let got = run(&c, threads).unwrap();
        for (g, w) in got.iter().zip(c.reference()) {
            prop_assert!((f64::from(*g) - w).abs() < 2e-5 * (1.0 + w.abs()), "got {g}, want {w}");
        }
        // the split over threads does not change a bit
        prop_assert_eq!(run(&c, 1).unwrap(), got);
    }
}

#[test]
fn padding_and_other_blocks_are_never_read() {
    // sequence 0 attends to positions 70..130 of a 3-block row; poison every
    // slot outside that range (its padding block and the rest of the cache)
    let mut c = case(3, 1, 2, 2, 8, 64, 3, 5, &[(70, 130)]);
    c.table = vec![4, 1, 3];
    let width = c.shape.kv_heads * c.shape.head_dim;
    let want = run(&c, 1).unwrap();
    for slot in 0..c.shape.n_blocks * 64 {
        let (block, off) = (slot / 64, slot % 64);
        let read = (block == 1 && off >= 6) || (block == 3 && off < 2);
        if !read {
            c.keys[slot * width..(slot + 1) * width].fill(f32::NAN);
            c.values[slot * width..(slot + 1) * width].fill(f32::NAN);
        }
    }
    assert_eq!(run(&c, 2).unwrap(), want);
    assert!(want.iter().all(|v| v.is_finite()));
}

#[test]
fn refusals_name_the_limit_and_leave_out_untouched() {
    let c = case(5, 2, 1, 2, 4, 4, 2, 3, &[(0, 8), (3, 5)]);
    let mut out = vec![7.0; 2 * 2 * 4];
    let mut bad = c.inputs();
    let end = [0i64, 5];
    bad.context_end = &end;
    let e = paged_decode(&c.shape, &bad, &mut out, 1).unwrap_err();
    assert_eq!(e, KernelError::Context { seq: 0, start: 0, end: 0, limit: 8 });
    let past = [9i64, 5];
    bad.context_end = &past;
    assert!(matches!(paged_decode(&c.shape, &bad, &mut out, 1), Err(KernelError::Context { seq: 0, .. })));
    let table = [0i64, 1, 2, 3];
    let mut bad = c.inputs();
    bad.block_table = &table;
    let e = paged_decode(&c.shape, &bad, &mut out, 1).unwrap_err();
    assert_eq!(e, KernelError::Block { seq: 1, position: 4, block: 3, n_blocks: 3 });
    assert!(e.to_string().contains("outside the cache's 3 blocks"), "{e}");
    let mut short = out.clone();
    short.pop();
    let e = paged_decode(&c.shape, &c.inputs(), &mut short, 1).unwrap_err();
    assert_eq!(e, KernelError::Length { what: "out", expected: 16, got: 15 });
    let mut shape = c.shape;
    shape.kv_heads = 3;
    assert!(matches!(paged_decode(&shape, &c.inputs(), &mut out, 1), Err(KernelError::Shape(_))));
    assert!(out.iter().all(|v| *v == 7.0));
    // an empty batch is fine
    let mut empty = c.shape;
    empty.batch = 0;
    let none = DecodeInputs { query: &[], block_table: &[], context_start: &[], context_end: &[], ..c.inputs() };
    paged_decode(&empty, &none, &mut [], 4).unwrap();
}

#[test]
fn large_batches_split_over_threads_bit_identically() {
    // enough work (3 x ~4000 keys x 6 heads x 128) for the kernel to start threads
    let c = case(11, 3, 2, 3, 64, 64, 64, 70, &[(0, 4096), (100, 4000), (2047, 4095)]);
    let one = run(&c, 1).unwrap();
    for (g, w) in one.iter().zip(c.reference()) {
        assert!((f64::from(*g) - w).abs() < 2e-5 * (1.0 + w.abs()), "got {g}, want {w}");
    }
    for threads in [2, 3, 8] {
        assert_eq!(run(&c, threads).unwrap(), one, "{threads} threads");
    }
}
