//! The scheduler's static limits, resolved once: defaults filled, every value
//! checked. Everything downstream (scheduler, simulation, the Python engine)
//! takes a [`SchedulerConfig`] instead of loose numbers.

use crate::error::ConfigError;

pub use crate::{BLOCK_SIZE, MAX_AVAILABLE_BLOCKS};

/// Options of the chunked-prefill policy (see `docs/design.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkOptions {
    /// Prompt tokens per prefill chunk, a positive multiple of [`BLOCK_SIZE`].
    pub chunk_size: u32,
    /// A decode step runs between two prefill chunks while decoders exist.
    pub interleave: bool,
    /// Decodes that would overflow the batch x tkv limit are paused instead
    /// of refusing admission up front.
    pub decode_pausing: bool,
    /// Full prompt blocks already in the KV cache are reused.
    pub prefix_caching: bool,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self { chunk_size: 128, interleave: true, decode_pausing: true, prefix_caching: false }
    }
}

/// Which scheduling policy a scheduler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The published continuous-batching policy: one shared batch tkv,
    /// whole-prompt prefills (the default).
    #[default]
    Continuous,
    /// Chunked prefill with interleaving, decode pausing and prefix caching.
    Chunked(ChunkOptions),
}

impl Policy {
    /// `"continuous"` or `"chunked"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Continuous => "continuous",
            Self::Chunked(_) => "chunked",
        }
    }
    /// Whether plans of this policy can contain chunks.
    pub fn is_chunked(&self) -> bool {
        matches!(self, Self::Chunked(_))
    }
    pub fn chunk_options(&self) -> Option<&ChunkOptions> {
        match self {
            Self::Continuous => None,
            Self::Chunked(o) => Some(o),
        }
    }
}

/// The static limits the scheduler works within (see `docs/design.md`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SchedulerConfig {
    /// Most sequences in the decode batch at once.
    pub max_num_seqs: u32,
    /// Longest sequence (prompt + generated), a multiple of [`BLOCK_SIZE`].
    pub max_model_len: u32,
    /// Usable KV blocks (the physical null block comes on top of these).
    pub available_blocks: u32,
    /// Largest batch size x tkv the compiled program supports.
    pub max_batch_tkv_limit: u64,
    /// The scheduling policy and its options.
    pub policy: Policy,
}

impl SchedulerConfig {
    /// Builds a config, filling the defaults of the design:
    /// `available_blocks = max_num_seqs * max_model_len / 64`,
    /// `max_batch_tkv_limit = max_model_len * max_num_seqs`.
    pub fn new(
        max_num_seqs: u32,
        max_model_len: u32,
        available_blocks: Option<u32>,
        max_batch_tkv_limit: Option<u64>,
    ) -> Result<Self, ConfigError> {
        Self::with_policy(max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit, Policy::Continuous)
    }

    /// [`SchedulerConfig::new`] for a given policy. Under the chunked policy
    /// `max_model_len` need not be a multiple of the block size (the default
    /// pool then rounds each sequence up to whole blocks).
    pub fn with_policy(
        max_num_seqs: u32,
        max_model_len: u32,
        available_blocks: Option<u32>,
        max_batch_tkv_limit: Option<u64>,
        policy: Policy,
    ) -> Result<Self, ConfigError> {
        if max_num_seqs < 1 {
            return Err(ConfigError::MaxNumSeqs { got: max_num_seqs });
        }
        match policy {
            Policy::Continuous => {
                if max_model_len < BLOCK_SIZE || !max_model_len.is_multiple_of(BLOCK_SIZE) {
                    return Err(ConfigError::MaxModelLen { got: max_model_len });
                }
            }
            Policy::Chunked(o) => {
                if max_model_len < 2 {
                    return Err(ConfigError::MaxModelLenChunked { got: max_model_len });
                }
                if o.chunk_size < BLOCK_SIZE || o.chunk_size % BLOCK_SIZE != 0 {
                    return Err(ConfigError::ChunkSize { got: o.chunk_size });
                }
            }
        }
        let blocks_per_seq = max_model_len.div_ceil(BLOCK_SIZE);
        let blocks = match available_blocks {
            Some(n) => u64::from(n),
            None => u64::from(max_num_seqs) * u64::from(blocks_per_seq),
        };
        if blocks > u64::from(MAX_AVAILABLE_BLOCKS) {
            return Err(ConfigError::TooManyBlocks { blocks, defaulted: available_blocks.is_none() });
        }
        let blocks = blocks as u32;
        if blocks < blocks_per_seq {
            return Err(ConfigError::TooFewBlocks { blocks, max_model_len, blocks_per_seq });
        }
        let limit = max_batch_tkv_limit.unwrap_or(u64::from(max_model_len) * u64::from(max_num_seqs));
        if limit < 1 {
            return Err(ConfigError::BatchTkvLimit { got: limit });
        }
        Ok(Self { max_num_seqs, max_model_len, available_blocks: blocks, max_batch_tkv_limit: limit, policy })
    }

    /// Physical blocks a KV cache must hold: the usable ones plus the null block.
    pub fn n_physical_blocks(&self) -> u32 {
        self.available_blocks + 1
    }

    /// Blocks one sequence of `max_model_len` tokens spans.
    pub fn max_blocks_per_seq(&self) -> u32 {
        self.max_model_len.div_ceil(BLOCK_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let c = SchedulerConfig::new(4, 256, None, None).unwrap();
        assert_eq!((c.available_blocks, c.max_batch_tkv_limit, c.n_physical_blocks()), (16, 1024, 17));
        assert!(matches!(SchedulerConfig::new(0, 256, None, None), Err(ConfigError::MaxNumSeqs { got: 0 })));
        assert!(matches!(SchedulerConfig::new(1, 100, None, None), Err(ConfigError::MaxModelLen { got: 100 })));
        assert!(matches!(SchedulerConfig::new(1, 256, Some(3), None), Err(ConfigError::TooFewBlocks { .. })));
        assert!(matches!(SchedulerConfig::new(1, 256, None, Some(0)), Err(ConfigError::BatchTkvLimit { got: 0 })));
        let e = SchedulerConfig::new(1, 256, Some(u32::MAX - 1), None).unwrap_err();
        assert!(e.to_string().contains("16777216"), "{e}");
        let e = SchedulerConfig::new(u32::MAX, 1 << 20, None, None).unwrap_err();
        assert!(e.to_string().contains("max_num_seqs * max_model_len / 64"), "{e}");
    }
}
