//! Batches of an encoder (pooling) model's requests, in Spyre's static shapes.
//!
//! An embedding request has no decode: its prompt runs through the encoder
//! once and its hidden states are pooled. A Spyre card runs only shapes it
//! was compiled for, so a batch's rows are right-padded to one length, a
//! multiple of the block size (64, 128, ... up to `max_model_len`), and a
//! batch holds at most `max_batch` rows and `max_batch_tokens` padded
//! tokens (rows × padded length). The shapes a server can meet are thus
//! `(rows ≤ max_batch, padded length ∈ {64, 128, ..., max_model_len})`.
//!
//! [`plan_pooling`] groups requests by padded length (a row is never padded
//! beyond its own length's bucket, so no compute is spent on padding a
//! shorter bucket could avoid), the oldest first within a bucket, and the
//! buckets in the order of their oldest request, so the request that has
//! waited longest runs in the first batch.

use crate::BLOCK_SIZE;

/// One batch: the requests' indices (into the lengths given) and the length
/// every row is padded to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolingBatch {
    pub rows: Vec<usize>,
    pub padded_len: u32,
}

/// Why a pooling plan cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolingError {
    /// A request with no tokens (at `index`).
    Empty { index: usize },
    /// A request longer than `max_model_len`.
    TooLong { index: usize, len: u32, max_model_len: u32 },
    /// `max_batch` or `max_batch_tokens` cannot fit one row of `max_model_len`.
    Limits { max_batch: u32, max_batch_tokens: u64, max_model_len: u32 },
}

impl std::fmt::Display for PoolingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty { index } => write!(f, "input {index} is empty: an embedding needs at least one token"),
            Self::TooLong { index, len, max_model_len } => {
                write!(f, "input {index} has {len} tokens, more than max_model_len {max_model_len}")
            }
            Self::Limits { max_batch, max_batch_tokens, max_model_len } => write!(
                f,
                "max_num_seqs {max_batch} and max_batch_tkv_limit {max_batch_tokens} must fit one row of \
                 max_model_len {max_model_len} (padded to a multiple of {BLOCK_SIZE})"
            ),
        }
    }
}

impl std::error::Error for PoolingError {}

/// The padded length of a row of `len` tokens: the next multiple of the block size.
#[inline]
pub fn padded_len(len: u32) -> u32 {
    len.div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE
}

/// The batches that run `lengths` (in arrival order), as the module says.
pub fn plan_pooling(
    lengths: &[u32],
    max_batch: u32,
    max_batch_tokens: u64,
    max_model_len: u32,
) -> Result<Vec<PoolingBatch>, PoolingError> {
    let largest = padded_len(max_model_len);
    if max_batch == 0 || max_batch_tokens < u64::from(largest) {
        return Err(PoolingError::Limits { max_batch, max_batch_tokens, max_model_len });
    }
    for (index, &len) in lengths.iter().enumerate() {
        if len == 0 {
            return Err(PoolingError::Empty { index });
        }
        if len > max_model_len {
            return Err(PoolingError::TooLong { index, len, max_model_len });
        }
    }
    // buckets in the order their first request arrived; rows in arrival order within each
    let mut buckets: Vec<(u32, Vec<usize>)> = Vec::new();
    for (index, &len) in lengths.iter().enumerate() {
        let p = padded_len(len);
        match buckets.iter_mut().find(|(q, _)| *q == p) {
            Some((_, rows)) => rows.push(index),
            None => buckets.push((p, vec![index])),
        }
    }
    let mut batches = Vec::new();
    for (p, rows) in buckets {
        let per_batch = (max_batch_tokens / u64::from(p)).min(u64::from(max_batch)) as usize;
        for chunk in rows.chunks(per_batch) {
            batches.push(PoolingBatch { rows: chunk.to_vec(), padded_len: p });
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_by_padded_length_oldest_first() {
        let plan = plan_pooling(&[70, 3, 64, 65, 128, 1], 8, 4096, 512).unwrap();
        assert_eq!(
            plan,
            vec![
                PoolingBatch { rows: vec![0, 3, 4], padded_len: 128 },
                PoolingBatch { rows: vec![1, 2, 5], padded_len: 64 },
            ]
        );
    }

    #[test]
    fn splits_by_rows_and_tokens() {
        let plan = plan_pooling(&[10; 5], 2, 4096, 512).unwrap();
        assert_eq!(plan.iter().map(|b| b.rows.len()).collect::<Vec<_>>(), [2, 2, 1]);
        // 300 tokens pad to 320; 700 padded tokens hold two such rows
        let plan = plan_pooling(&[300, 300, 300], 8, 700, 512).unwrap();
        assert_eq!(plan.iter().map(|b| b.rows.clone()).collect::<Vec<_>>(), [vec![0, 1], vec![2]]);
        assert!(plan.iter().all(|b| b.padded_len == 320));
    }

    #[test]
    fn every_request_once_within_limits() {
        let mut seed = 12345u64;
        for _ in 0..200 {
            let n = (seed % 40) as usize;
            let lengths: Vec<u32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1 + ((seed >> 33) % 512) as u32
                })
                .collect();
            let (mb, mt) = (1 + (seed % 7) as u32, 512 + (seed >> 40) % 3000);
            let plan = plan_pooling(&lengths, mb, mt, 512).unwrap();
            let mut seen: Vec<usize> = plan.iter().flat_map(|b| b.rows.clone()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            for b in &plan {
                assert!(!b.rows.is_empty() && b.rows.len() as u32 <= mb);
                assert!(b.rows.len() as u64 * u64::from(b.padded_len) <= mt);
                assert!(b.rows.iter().all(|&i| padded_len(lengths[i]) == b.padded_len));
            }
        }
    }

    #[test]
    fn refuses_empty_too_long_and_impossible_limits() {
        assert_eq!(plan_pooling(&[3, 0], 4, 4096, 512), Err(PoolingError::Empty { index: 1 }));
        assert_eq!(
            plan_pooling(&[513], 4, 4096, 512),
            Err(PoolingError::TooLong { index: 0, len: 513, max_model_len: 512 })
        );
        assert!(matches!(plan_pooling(&[1], 4, 100, 512), Err(PoolingError::Limits { .. })));
        assert!(plan_pooling(&[], 4, 4096, 512).unwrap().is_empty());
    }
}
