//! Engine limits and their defaults.

use crate::error::ConfigError;

/// KV-cache slots per block (a Spyre constraint).
pub const BLOCK_SIZE: u32 = 64;

/// The static limits the scheduler works within.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most sequences in the decode batch at once.
    pub max_num_seqs: u32,
    /// Longest sequence (prompt + generated), a multiple of [`BLOCK_SIZE`].
    pub max_model_len: u32,
    /// Usable KV blocks (the physical null block comes on top of these).
    pub n_blocks: u32,
    /// Largest batch size x tkv the compiled program supports.
    pub max_batch_tkv_limit: u64,
}

impl Config {
    /// Builds a config, filling the defaults of the design:
    /// `n_blocks = max_num_seqs * max_model_len / 64`,
    /// `max_batch_tkv_limit = max_model_len * max_num_seqs`.
    pub fn new(
        max_num_seqs: u32,
        max_model_len: u32,
        n_blocks: Option<u32>,
        max_batch_tkv_limit: Option<u64>,
    ) -> Result<Self, ConfigError> {
        if max_num_seqs < 1 {
            return Err(ConfigError::new(format!(
                "max_num_seqs must be at least 1, got {max_num_seqs}"
            )));
        }
        if max_model_len < BLOCK_SIZE || max_model_len % BLOCK_SIZE != 0 {
            return Err(ConfigError::new(format!(
                "max_model_len must be a positive multiple of the block size {BLOCK_SIZE}, got {max_model_len}"
            )));
        }
        let default_blocks = u64::from(max_num_seqs) * u64::from(max_model_len) / u64::from(BLOCK_SIZE);
        let n_blocks = match n_blocks {
            Some(n) => n,
            None => u32::try_from(default_blocks).map_err(|_| {
                ConfigError::new(format!(
                    "default block count max_num_seqs * max_model_len / {BLOCK_SIZE} = {default_blocks} exceeds {}",
                    u32::MAX - 1
                ))
            })?,
        };
        let blocks_per_seq = max_model_len / BLOCK_SIZE;
        if n_blocks < blocks_per_seq {
            return Err(ConfigError::new(format!(
                "available_blocks {n_blocks} is fewer than one sequence of max_model_len {max_model_len} needs ({blocks_per_seq} blocks of {BLOCK_SIZE})"
            )));
        }
        if n_blocks == u32::MAX {
            return Err(ConfigError::new(format!(
                "available_blocks must be below {}, got {n_blocks}",
                u32::MAX
            )));
        }
        let limit = max_batch_tkv_limit.unwrap_or(u64::from(max_model_len) * u64::from(max_num_seqs));
        if limit < 1 {
            return Err(ConfigError::new(format!(
                "max_batch_tkv_limit must be at least 1, got {limit}"
            )));
        }
        Ok(Self { max_num_seqs, max_model_len, n_blocks, max_batch_tkv_limit: limit })
    }
}
