//! One request's scheduling state.

use std::sync::Arc;

use crate::block_pool::BlockId;
use crate::config::BLOCK_SIZE;

/// A request known to the scheduler, waiting or running.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub id: Arc<str>,
    /// Prompt token ids; empty for token-less (simulation) requests, and
    /// dropped once the prefill plan has copied them.
    pub prompt: Vec<u32>,
    pub prompt_len: u32,
    pub max_tokens: u32,
    /// Tokens generated so far (the prefill produces the first).
    pub generated: u32,
    /// The most recent generated token: the next decode's input.
    pub last_token: u32,
    /// Left padding in tokens, counted from virtual position 0 of the batch,
    /// fully padded (never allocated) blocks included. The sequence's tokens
    /// occupy positions `left_pad..tkv`.
    pub left_pad: u32,
    /// Allocated blocks, from the first block that is not fully padded.
    pub blocks: Vec<BlockId>,
    /// Blocks reserved at prefill for the worst case.
    pub reserved: u32,
    /// Caller's numeric tag (simulations: the request's index).
    pub tag: u32,
}

impl Request {
    pub fn new(id: Arc<str>, prompt: Vec<u32>, prompt_len: u32, max_tokens: u32) -> Self {
        Self {
            id,
            prompt,
            prompt_len,
            max_tokens,
            generated: 0,
            last_token: 0,
            left_pad: 0,
            blocks: Vec::new(),
            reserved: 0,
            tag: 0,
        }
    }

    /// Leading blocks that hold nothing but padding.
    #[inline]
    pub fn fully_padded_blocks(&self) -> u32 {
        self.left_pad / BLOCK_SIZE
    }

    /// Decode steps still to run (and tokens still to generate).
    #[inline]
    pub fn remaining(&self) -> u32 {
        self.max_tokens - self.generated
    }
}
