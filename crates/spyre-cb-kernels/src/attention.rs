//! Decode attention over a paged KV cache, one query per sequence.
//!
//! Sequence `b` attends to the keys at in-table positions
//! `context_start[b] <= j < context_end[b]` of its block table: position `j`
//! lives in slot `j % block_size` of block `block_table[b][j / block_size]`.
//! (`context_start` is the sequence's left padding and `context_end` the
//! batch `tkv` in the continuous policy; the query is the token at
//! `context_end - 1`, whose key the step has already stored.) Query heads
//! share key/value heads in groups (`n_heads / kv_heads` query heads per KV
//! head, grouped-query attention); the result is
//! `softmax(scale * q k^T) v` per query head, computed exactly, without a
//! mask: positions outside the range are never read.

use std::fmt;
use std::sync::Mutex;

use crate::math::{self, CacheElem};
use crate::parallel;

/// Sizes of one call. Tensors are dense, row-major, in the layouts given on
/// [`DecodeInputs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub n_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub n_blocks: usize,
    pub block_size: usize,
    pub table_width: usize,
}

/// Borrowed inputs of [`paged_decode`]; the caches hold `f32`, or bfloat16 bits as `u16`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeInputs<'a, E = f32> {
    /// `[batch, n_heads, head_dim]`.
    pub query: &'a [f32],
    /// `[n_blocks, block_size, kv_heads, head_dim]`.
    pub key_cache: &'a [E],
    /// `[n_blocks, block_size, kv_heads, value_dim]`.
    pub value_cache: &'a [E],
    /// `[batch, table_width]` physical block ids.
    pub block_table: &'a [i64],
    /// `[batch]`: first attended in-table position (the left padding).
    pub context_start: &'a [i64],
    /// `[batch]`: one past the last attended position (the query's own).
    pub context_end: &'a [i64],
    /// Multiplies `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// An input the kernel refuses; nothing is read out of bounds and `out` is
/// left untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length disagrees with the shape.
    Length { what: &'static str, expected: usize, got: usize },
    /// A size that must be positive is zero, or heads do not group.
    Shape(String),
    /// A sequence's attended range is empty or runs past its block table.
    Context { seq: usize, start: i64, end: i64, limit: usize },
    /// A block id the range reads is not a block of the cache.
    Block { seq: usize, position: usize, block: i64, n_blocks: usize },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { what, expected, got } => {
                write!(f, "paged decode attention: {what} holds {got} elements, the shape needs {expected}")
            }
            Self::Shape(msg) => write!(f, "paged decode attention: {msg}"),
            Self::Context { seq, start, end, limit } => write!(
                f,
                "paged decode attention: sequence {seq} attends to positions {start}..{end}, which must be a \
                 non-empty range within its block table's {limit} slots"
            ),
            Self::Block { seq, position, block, n_blocks } => write!(
                f,
                "paged decode attention: sequence {seq} reads position {position} from block {block}, outside the \
                 cache's {n_blocks} blocks"
            ),
        }
    }
}

impl std::error::Error for KernelError {}

/// `a * b`, or the error a shape whose sizes overflow gets.
pub(crate) fn checked_mul(a: usize, b: usize) -> Result<usize, KernelError> {
    a.checked_mul(b).ok_or_else(|| KernelError::Shape("sizes overflow".into()))
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length { what, expected, got })
    }
}

pub(crate) fn validate<E: CacheElem>(
    s: &DecodeShape,
    x: &DecodeInputs<'_, E>,
    out_len: usize,
) -> Result<(), KernelError> {
    let positive = [
        ("n_heads", s.n_heads),
        ("kv_heads", s.kv_heads),
        ("head_dim", s.head_dim),
        ("value_dim", s.value_dim),
        ("block_size", s.block_size),
    ];
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(KernelError::Shape(format!("{name} must be positive")));
    }
    if !s.n_heads.is_multiple_of(s.kv_heads) {
        return Err(KernelError::Shape(format!(
            "{} query heads do not divide into groups over {} KV heads",
            s.n_heads, s.kv_heads
        )));
    }
    let mul = checked_mul;
    let slots = mul(s.n_blocks, s.block_size)?;
    check_len("query", mul(mul(s.batch, s.n_heads)?, s.head_dim)?, x.query.len())?;
    check_len("key_cache", mul(mul(slots, s.kv_heads)?, s.head_dim)?, x.key_cache.len())?;
    check_len("value_cache", mul(mul(slots, s.kv_heads)?, s.value_dim)?, x.value_cache.len())?;
    check_len("block_table", mul(s.batch, s.table_width)?, x.block_table.len())?;
    check_len("context_start", s.batch, x.context_start.len())?;
    check_len("context_end", s.batch, x.context_end.len())?;
    check_len("out", mul(mul(s.batch, s.n_heads)?, s.value_dim)?, out_len)?;
    let limit = mul(s.table_width, s.block_size)?;
    for seq in 0..s.batch {
        let (start, end) = (x.context_start[seq], x.context_end[seq]);
        if start < 0 || end <= start || end as u64 > limit as u64 {
            return Err(KernelError::Context { seq, start, end, limit });
        }
        let (first, last) = (start as usize / s.block_size, (end as usize - 1) / s.block_size);
        let row = &x.block_table[seq * s.table_width..(seq + 1) * s.table_width];
        for (w, &block) in row.iter().enumerate().take(last + 1).skip(first) {
            if block < 0 || block as u64 >= s.n_blocks as u64 {
                let position = (start as usize).max(w * s.block_size);
                return Err(KernelError::Block { seq, position, block, n_blocks: s.n_blocks });
            }
        }
    }
    Ok(())
}

/// Multiply-adds below which one more thread does not pay for its start.
const MIN_WORK_PER_THREAD: usize = 1 << 21;
/// The same on a host's running workers ([`parallel::set_fork_join`]).
const MIN_WORK_PER_POOLED_THREAD: usize = 1 << 17;

/// Decode attention of `shape.batch` sequences into `out`
/// (`[batch, n_heads, value_dim]`), split over up to `threads` threads (the
/// calling one included) by sequence when the work is large
/// enough to pay for starting them.
pub fn paged_decode<E: CacheElem>(
    shape: &DecodeShape,
    inputs: &DecodeInputs<'_, E>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), KernelError> {
    validate(shape, inputs, out.len())?;
    let item_len = shape.n_heads * shape.value_dim;
    if shape.batch == 0 {
        return Ok(());
    }
    // a thread is worth starting only for enough work (starting one costs
    // tens of microseconds)
    let work: usize =
        (0..shape.batch).map(|b| (inputs.context_end[b] - inputs.context_start[b]) as usize).sum::<usize>()
            * shape.n_heads
            * (shape.head_dim + shape.value_dim);
    let min_work = if parallel::pooled() { MIN_WORK_PER_POOLED_THREAD } else { MIN_WORK_PER_THREAD };
    let threads = threads.min(work / min_work).clamp(1, shape.batch);
    let per_thread = shape.batch.div_ceil(threads);
    let parts: Vec<Mutex<&mut [f32]>> = out.chunks_mut(per_thread * item_len).map(Mutex::new).collect();
    parallel::for_each(threads, parts.len(), &|t| {
        let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        run(shape, inputs, t * per_thread, &mut part);
    });
    Ok(())
}

/// Items `first..` (as many as `out` holds), in the widest instruction set
/// this CPU has.
fn run<E: CacheElem>(shape: &DecodeShape, inputs: &DecodeInputs<'_, E>, first: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::fits(shape) {
            // SAFETY: `fits` checked the CPU's features and the head sizes.
            unsafe { avx512::run(shape, inputs, first, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { run_avx2(shape, inputs, first, out) };
            return;
        }
    }
    run_items(shape, inputs, first, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<E: CacheElem>(shape: &DecodeShape, inputs: &DecodeInputs<'_, E>, first: usize, out: &mut [f32]) {
    run_items(shape, inputs, first, out);
}

#[inline(always)]
fn run_items<E: CacheElem>(s: &DecodeShape, x: &DecodeInputs<'_, E>, first: usize, out: &mut [f32]) {
    let mut scratch = Scratch::default();
    for (k, out_seq) in out.chunks_mut(s.n_heads * s.value_dim).enumerate() {
        attend(s, x, first + k, out_seq, &mut scratch);
    }
}

/// Buffers one thread reuses from sequence to sequence.
#[derive(Default)]
struct Scratch {
    /// `[n_heads, n]` scores, then probabilities (unnormalized).
    scores: Vec<f32>,
    /// `1 / Σ` of each query head's probabilities.
    norms: Vec<f32>,
    /// The cache slot of each attended position (AVX-512 path).
    slots: Vec<usize>,
    /// Keys of [`avx512::POSITIONS`] positions of one KV head, as `f32` (AVX-512 path).
    keys: Vec<f32>,
    /// The sequence's queries as bfloat16 bits (AVX-512 path, bfloat16 cache).
    query_bits: Vec<u16>,
}

/// The softmax of every row of `scores` (`[heads, n]`) in place, unnormalized:
/// `1 / Σ` of each row into `norms`.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], n: usize, norms: &mut Vec<f32>) {
    norms.clear();
    for row in scores.chunks_exact_mut(n) {
        let m = math::max(row);
        norms.push(1.0 / math::exp_shifted_sum(row, m));
    }
}

/// `(i, slot)` for the positions `start + i < end` of a block table row.
#[inline(always)]
fn slots(table: &[i64], start: usize, end: usize, bs: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    (start / bs..=(end - 1) / bs).flat_map(move |w| {
        let base = table[w] as usize * bs;
        (start.max(w * bs)..end.min((w + 1) * bs)).map(move |j| (j - start, base + j - w * bs))
    })
}

/// All query heads of sequence `seq` (inputs validated). The cache is read
/// slot after slot, every KV head of a slot at once: within a block that is
/// one sequential stream of memory, which the hardware prefetches (reading
/// one KV head at a time strides over the others and waits on memory).
#[inline(always)]
fn attend<E: CacheElem>(s: &DecodeShape, x: &DecodeInputs<'_, E>, seq: usize, out: &mut [f32], scratch: &mut Scratch) {
    let (h_n, kvh, group) = (s.n_heads, s.kv_heads, s.n_heads / s.kv_heads);
    let (d, dv, bs) = (s.head_dim, s.value_dim, s.block_size);
    let start = x.context_start[seq] as usize;
    let end = x.context_end[seq] as usize;
    let n = end - start;
    let table = &x.block_table[seq * s.table_width..(seq + 1) * s.table_width];
    let queries = &x.query[seq * h_n * d..(seq + 1) * h_n * d];
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(h_n * n, 0.0);
    for (i, slot) in slots(table, start, end, bs) {
        let keys = &x.key_cache[slot * kvh * d..(slot + 1) * kvh * d];
        for (h, q) in queries.chunks_exact(d).enumerate() {
            let g = h / group;
            scores[h * n + i] = math::dot(q, &keys[g * d..(g + 1) * d]) * x.scale;
        }
    }
    softmax_rows(scores, n, &mut scratch.norms);
    out.fill(0.0);
    for (i, slot) in slots(table, start, end, bs) {
        let values = &x.value_cache[slot * kvh * dv..(slot + 1) * kvh * dv];
        for (h, acc) in out.chunks_exact_mut(dv).enumerate() {
            let g = h / group;
            math::axpy(acc, scores[h * n + i], &values[g * dv..(g + 1) * dv]);
        }
    }
    for (acc, norm) in out.chunks_exact_mut(dv).zip(&scratch.norms) {
        math::scale(acc, *norm);
    }
}

/// Decode attention in AVX-512 for head sizes of 64 and 128 (keys and values
/// alike). Scores are computed 16 positions at a time: each position's dot
/// product with a query head is summed over the head size in one 16-lane
/// register, and the 16 registers are then reduced together, each lane of the
/// result one position's score, so the horizontal sums cost about 3
/// instructions a score instead of ~8 each. A KV head's keys are widened to
/// `f32` once for all its query heads. Probability-weighted values are summed
/// in registers for up to 4 query heads at a time, each value row widened
/// once for all of them.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{slots, softmax_rows, CacheElem, DecodeInputs, DecodeShape, Scratch};
    use crate::math::mask;

    /// Positions scored at a time: one per lane of the register their scores end in.
    pub(super) const POSITIONS: usize = 16;

    /// Whether this CPU and these head sizes take this path.
    pub(super) fn fits(s: &DecodeShape) -> bool {
        s.head_dim == s.value_dim
            && matches!(s.head_dim, 64 | 128)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }

    /// Items `first..` (as many as `out` holds).
    ///
    /// # Safety
    /// [`fits`] holds; the inputs are validated.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn run<E: CacheElem>(s: &DecodeShape, x: &DecodeInputs<'_, E>, first: usize, out: &mut [f32]) {
        let mut scratch = Scratch::default();
        for (k, out_seq) in out.chunks_mut(s.n_heads * s.value_dim).enumerate() {
            // SAFETY: the caller's contract
            unsafe {
                if s.head_dim == 64 {
                    attend::<E, 4, 4>(s, x, first + k, out_seq, &mut scratch);
                } else {
                    attend::<E, 8, 2>(s, x, first + k, out_seq, &mut scratch);
                }
            }
        }
    }

    /// Lane `p` of the result is the sum of `acc[p]`'s 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lane_sums(acc: &[__m512; POSITIONS]) -> __m512 {
        // pairs: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3]
        let s1: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (acc[2 * i], acc[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // fours: per 128-bit lane the sums of its 4 elements of a, b, c, d
        let s2: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (s1[2 * i], s1[2 * i + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y))
        });
        // then across the four 128-bit lanes
        let s3: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (s2[2 * i], s2[2 * i + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
        });
        let (x, y) = (s3[0], s3[1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
    }

    /// `scale` times the lane sums of `acc` (lane p: register p's sum) into
    /// `row`, one score a position (at most 16).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store_scores(row: &mut [f32], acc: &[__m512; POSITIONS], scale: __m512) {
        // SAFETY: the mask writes the row's len() <= 16 elements
        unsafe { _mm512_mask_storeu_ps(row.as_mut_ptr(), mask(row.len()), _mm512_mul_ps(lane_sums(acc), scale)) };
    }

    /// The scaled scores of KV head `g`'s query heads (their rows of `scores`,
    /// `[n_heads, n]`) from a bfloat16 cache as it lies: `vdpbf16ps` multiplies
    /// pairs of query (bfloat16 values, given as bits) and key elements, 32
    /// products an instruction, into `f32` sums; `C` registers of 16 lanes
    /// per head size (`head_dim == 16 * C`).
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX512_BF16; the inputs are validated.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn scores_bf16<const C: usize>(
        keys: &[u16],
        slots: &[usize],
        s: &DecodeShape,
        g: usize,
        query_bits: &[u16],
        scale: f32,
        scores: &mut [f32],
    ) {
        let (kvh, group, d, n) = (s.kv_heads, s.n_heads / s.kv_heads, 16 * C, slots.len());
        let load = |p: *const u16| {
            // SAFETY: callers pass 32 readable elements
            unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
        };
        let scale = _mm512_set1_ps(scale);
        for i0 in (0..n).step_by(POSITIONS) {
            let m = (n - i0).min(POSITIONS);
            for h in g * group..(g + 1) * group {
                let q = &query_bits[h * d..(h + 1) * d];
                let mut acc = [_mm512_setzero_ps(); POSITIONS];
                for (a, &slot) in acc.iter_mut().zip(&slots[i0..i0 + m]) {
                    let k = &keys[(slot * kvh + g) * d..(slot * kvh + g + 1) * d];
                    let mut sum = _mm512_setzero_ps();
                    for c in 0..C / 2 {
                        // both hold d = 32 (C / 2) elements
                        sum = _mm512_dpbf16_ps(sum, load(q[32 * c..].as_ptr()), load(k[32 * c..].as_ptr()));
                    }
                    *a = sum;
                }
                store_scores(&mut scores[h * n + i0..h * n + i0 + m], &acc, scale);
            }
        }
    }

    /// All query heads of sequence `seq`: `C` registers per head, `HB` query
    /// heads' value sums held in registers at a time.
    ///
    /// # Safety
    /// [`fits`] holds, `head_dim == 16 * C`; the inputs are validated.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn attend<E: CacheElem, const C: usize, const HB: usize>(
        s: &DecodeShape,
        x: &DecodeInputs<'_, E>,
        seq: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let (kvh, group, d) = (s.kv_heads, s.n_heads / s.kv_heads, 16 * C);
        let start = x.context_start[seq] as usize;
        let end = x.context_end[seq] as usize;
        let n = end - start;
        let table = &x.block_table[seq * s.table_width..(seq + 1) * s.table_width];
        let queries = &x.query[seq * s.n_heads * d..(seq + 1) * s.n_heads * d];
        scratch.slots.clear();
        scratch.slots.extend(slots(table, start, end, s.block_size).map(|(_, slot)| slot));
        scratch.scores.clear();
        scratch.scores.resize(s.n_heads * n, 0.0);
        scratch.keys.resize(POSITIONS * d, 0.0);
        let scale = _mm512_set1_ps(x.scale);
        // a bfloat16 cache and queries that are bfloat16 values (a bfloat16 model's
        // are): scores straight from the cache, 32 products an instruction
        let bf16_keys = E::bf16_bits(x.key_cache).filter(|_| {
            std::arch::is_x86_feature_detected!("avx512bf16") && queries.iter().all(|q| q.to_bits() & 0xffff == 0)
        });
        if let Some(keys) = bf16_keys {
            scratch.query_bits.clear();
            scratch.query_bits.extend(queries.iter().map(|q| (q.to_bits() >> 16) as u16));
            let scores = &mut scratch.scores;
            for g in 0..kvh {
                // SAFETY: the CPU has AVX512_BF16 (checked above); the inputs are validated
                unsafe { scores_bf16::<C>(keys, &scratch.slots, s, g, &scratch.query_bits, x.scale, scores) };
            }
        } else {
            for g in 0..kvh {
                for i0 in (0..n).step_by(POSITIONS) {
                    let m = (n - i0).min(POSITIONS);
                    for (p, &slot) in scratch.slots[i0..i0 + m].iter().enumerate() {
                        let from = &x.key_cache[(slot * kvh + g) * d..(slot * kvh + g + 1) * d];
                        for c in 0..C {
                            // SAFETY: `from` holds d = 16 C elements, `keys` 16 d
                            unsafe {
                                _mm512_storeu_ps(
                                    scratch.keys.as_mut_ptr().add(p * d + 16 * c),
                                    E::load16(from.as_ptr().add(16 * c)),
                                )
                            };
                        }
                    }
                    for h in g * group..(g + 1) * group {
                        let q = &queries[h * d..(h + 1) * d];
                        // SAFETY: `q` holds 16 C elements
                        let qv: [__m512; C] =
                            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * c)) });
                        let mut acc = [_mm512_setzero_ps(); POSITIONS];
                        for (p, a) in acc.iter_mut().enumerate().take(m) {
                            let k = &scratch.keys[p * d..(p + 1) * d];
                            // SAFETY: `k` holds 16 C elements
                            unsafe {
                                let mut sum = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k.as_ptr()));
                                for (c, qc) in qv.iter().enumerate().skip(1) {
                                    sum = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(k.as_ptr().add(16 * c)), sum);
                                }
                                *a = sum;
                            }
                        }
                        store_scores(&mut scratch.scores[h * n + i0..h * n + i0 + m], &acc, scale);
                    }
                }
            }
        }
        softmax_rows(&mut scratch.scores, n, &mut scratch.norms);
        for g in 0..kvh {
            for h0 in (g * group..(g + 1) * group).step_by(HB) {
                let hn = (group * (g + 1) - h0).min(HB);
                let mut acc = [[_mm512_setzero_ps(); C]; HB];
                for (i, &slot) in scratch.slots.iter().enumerate() {
                    let from = &x.value_cache[(slot * kvh + g) * d..(slot * kvh + g + 1) * d];
                    // SAFETY: `from` holds 16 C elements
                    let v: [__m512; C] = std::array::from_fn(|c| unsafe { E::load16(from.as_ptr().add(16 * c)) });
                    for (j, a) in acc.iter_mut().enumerate() {
                        if j < hn {
                            let p = _mm512_set1_ps(scratch.scores[(h0 + j) * n + i]);
                            for c in 0..C {
                                a[c] = _mm512_fmadd_ps(p, v[c], a[c]);
                            }
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate().take(hn) {
                    let norm = _mm512_set1_ps(scratch.norms[h0 + j]);
                    let dst = &mut out[(h0 + j) * d..(h0 + j + 1) * d];
                    for (c, ac) in a.iter().enumerate() {
                        // SAFETY: `dst` holds 16 C elements
                        unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(16 * c), _mm512_mul_ps(*ac, norm)) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable path (what a CPU without AVX2 runs) against the
    /// dispatched one: same results up to the summation's rounding.
    #[test]
    fn portable_path_matches_the_dispatched_one() {
        let shape = DecodeShape {
            batch: 3,
            n_heads: 4,
            kv_heads: 2,
            head_dim: 24,
            value_dim: 24,
            n_blocks: 5,
            block_size: 8,
            table_width: 3,
        };
        let values = |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| ((i * k % 23) as f32 - 11.0) / 9.0).collect() };
        let slots = shape.n_blocks * shape.block_size * shape.kv_heads * shape.head_dim;
        let (q, kc, vc) = (values(3 * 4 * 24, 7), values(slots, 5), values(slots, 3));
        let table = [4i64, 0, 2, 1, 1, 3, 2, 4, 0];
        let inputs = DecodeInputs {
            query: &q,
            key_cache: &kc,
            value_cache: &vc,
            block_table: &table,
            context_start: &[0, 5, 17],
            context_end: &[24, 13, 18],
            scale: 0.2,
        };
        let mut dispatched = vec![0.0; 3 * 4 * 24];
        paged_decode(&shape, &inputs, &mut dispatched, 1).unwrap();
        let mut portable = vec![0.0; 3 * 4 * 24];
        run_items(&shape, &inputs, 0, &mut portable);
        for (a, b) in dispatched.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // a bfloat16 cache gives what the f32 cache of the same (bf16-exact) values gives
        let bf = |v: &[f32]| -> (Vec<u16>, Vec<f32>) {
            let bits: Vec<u16> = v.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
            let back = bits.iter().map(|b| f32::from_bits(u32::from(*b) << 16)).collect();
            (bits, back)
        };
        let ((kb, kf), (vb, vf)) = (bf(&kc), bf(&vc));
        let f32_inputs = DecodeInputs { key_cache: &kf, value_cache: &vf, ..inputs };
        let bf16_inputs = DecodeInputs {
            query: inputs.query,
            key_cache: &kb[..],
            value_cache: &vb[..],
            block_table: inputs.block_table,
            context_start: inputs.context_start,
            context_end: inputs.context_end,
            scale: inputs.scale,
        };
        let (mut want, mut got) = (vec![0.0; 3 * 4 * 24], vec![0.0; 3 * 4 * 24]);
        paged_decode(&shape, &f32_inputs, &mut want, 1).unwrap();
        paged_decode(&shape, &bf16_inputs, &mut got, 2).unwrap();
        assert_eq!(want, got);
    }

    /// The AVX-512 path (head sizes 64 and 128) against the portable loop:
    /// ranges shorter and longer than its 16 positions, starting mid-block,
    /// query-head groups that do and do not fill its blocks of heads, both caches.
    #[test]
    fn avx512_path_matches_the_portable_one() {
        for (d, n_heads, kv_heads) in [(64, 12, 4), (64, 4, 4), (64, 8, 1), (128, 6, 2), (128, 8, 2)] {
            let shape = DecodeShape {
                batch: 4,
                n_heads,
                kv_heads,
                head_dim: d,
                value_dim: d,
                n_blocks: 9,
                block_size: 16,
                table_width: 5,
            };
            if !avx512::fits(&shape) {
                return; // this CPU has no AVX-512: the portable test covers it
            }
            let values =
                |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| ((i * k % 29) as f32 - 14.0) / 11.0).collect() };
            let cache = shape.n_blocks * shape.block_size * kv_heads * d;
            let (q, kc, vc) = (values(4 * n_heads * d, 7), values(cache, 5), values(cache, 3));
            let table = [8i64, 0, 2, 1, 3, 3, 2, 4, 0, 7, 5, 6, 1, 8, 2, 0, 1, 2, 3, 4];
            let inputs = DecodeInputs {
                query: &q,
                key_cache: &kc,
                value_cache: &vc,
                block_table: &table,
                context_start: &[0, 5, 17, 40],
                context_end: &[80, 21, 18, 73],
                scale: 0.125,
            };
            let len = 4 * n_heads * d;
            let (mut fast, mut portable) = (vec![0.0; len], vec![0.0; len]);
            paged_decode(&shape, &inputs, &mut fast, 1).unwrap();
            run_items(&shape, &inputs, 0, &mut portable);
            for (a, b) in fast.iter().zip(&portable) {
                assert!((a - b).abs() < 1e-5, "d={d} heads={n_heads}/{kv_heads}: {a} vs {b}");
            }
            let bits: Vec<u16> = kc.iter().chain(&vc).map(|x| (x.to_bits() >> 16) as u16).collect();
            let (kb, vb) = bits.split_at(cache);
            // queries that are bfloat16 values, as a bfloat16 model's are: on a CPU
            // with AVX512_BF16 their scores come from `vdpbf16ps`
            let qb: Vec<f32> = q.iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
            let bf16 = DecodeInputs {
                query: &qb,
                key_cache: kb,
                value_cache: vb,
                block_table: inputs.block_table,
                context_start: inputs.context_start,
                context_end: inputs.context_end,
                scale: inputs.scale,
            };
            paged_decode(&shape, &bf16, &mut fast, 1).unwrap();
            run_items(&shape, &bf16, 0, &mut portable);
            for (a, b) in fast.iter().zip(&portable) {
                assert!((a - b).abs() < 1e-5, "bfloat16 d={d} heads={n_heads}/{kv_heads}: {a} vs {b}");
            }
        }
    }
}
