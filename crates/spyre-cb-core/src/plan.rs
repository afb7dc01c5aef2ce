//! The per-step plan: everything a model runner needs to build padded tensors,
//! already computed. Runners read it; they never redo tkv or block math.
//!
//! Coordinates: each sequence's block table starts at its first block that is
//! not fully padded, so "in-table" positions are virtual positions minus
//! `64 * fully_padded_blocks`. Slots are `block * 64 + offset` in a KV cache of
//! `n_blocks + 1` physical blocks (block 0 is the null block).

use std::sync::Arc;

use crate::block_pool::BlockId;

/// Prefill of one request (prefill batch size 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    pub request_id: Arc<str>,
    /// Batch tkv after this prefill; the prompt's last token sits at `tkv - 1`.
    pub tkv: u32,
    /// How far the running sequences moved right to make room (multiple of 64).
    pub tkv_shift: u32,
    /// The request starts a fresh batch.
    pub new_batch: bool,
    pub prompt_len: u32,
    /// Pad tokens before the prompt in the input (fully padded blocks cut off).
    pub left_padding: u32,
    /// Pad tokens after the prompt up to the block boundary.
    pub right_padding: u32,
    /// `left_padding + prompt + right_padding` token ids (pads are 0); empty
    /// for token-less (simulated) requests.
    pub input_ids: Vec<u32>,
    /// Position ids of the input: pads 0, prompt tokens `0..prompt_len`.
    pub positions: Vec<u32>,
    /// KV slot of every input token (pads included: they land in the
    /// sequence's own blocks and are masked out later).
    pub slot_mapping: Vec<i64>,
    /// Blocks allocated for this prefill.
    pub block_table: Vec<BlockId>,
    /// Index in the input of the last prompt token, whose logits give the
    /// first generated token.
    pub logits_index: u32,
    /// KV blocks to copy `(src, dst)` before this step's forward (beams given
    /// their own copy of a block they shared and will write).
    pub block_copies: Vec<(BlockId, BlockId)>,
}

impl PrefillPlan {
    /// Input length: a whole number of blocks.
    pub fn input_len(&self) -> u32 {
        self.left_padding + self.prompt_len + self.right_padding
    }
}

/// One chunk of a chunked prefill (chunked policy; runs alone in its step).
///
/// The input is `chunk_size` tokens: the chunk's stretch of the request's
/// padded prompt (left padding, whole blocks, in chunk 0 only; the prompt;
/// right padding up to the end of the prompt's last block). In-table
/// coordinates are prompt positions: the request's block table starts at
/// its first prompt block, so input token `t` sits at in-table position
/// `context_end - chunk_size + t` (negative for left padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub request_id: Arc<str>,
    /// The prompt length (the step's tkv).
    pub prompt_len: u32,
    /// Which chunk of the padded prompt this is, and how many there are.
    pub chunk_index: u32,
    pub chunk_count: u32,
    /// Input length (the policy's chunk size).
    pub chunk_size: u32,
    /// Pad tokens at the start of the input (non-zero only in chunk 0).
    pub left_padding: u32,
    /// Prompt positions `start..end` are computed by this chunk.
    pub start: u32,
    pub end: u32,
    /// In-table position just past the input's last token (prompt
    /// coordinates): queries attend to keys `0..=` their own position.
    pub context_end: u32,
    /// The last chunk: its last prompt token samples the first output token.
    pub is_last: bool,
    /// Input token ids (pads 0); empty for token-less (simulated) requests.
    pub input_ids: Vec<u32>,
    /// Position ids: prompt tokens their prompt index, pads 0.
    pub positions: Vec<u32>,
    /// KV slot of every input token; padding and blocks shared through a
    /// prefix hit (read only) map to the null block.
    pub slot_mapping: Vec<i64>,
    /// The same per input block (`chunk_size / 64` entries; 0 = null block).
    pub block_slots: Vec<u32>,
    /// The request's block table (prompt blocks from position 0).
    pub block_table: Vec<BlockId>,
    /// Index in the input of the last prompt token (meaningful when `is_last`).
    pub logits_index: u32,
    /// Blocks of the prompt reused from the cache (whole chunks skipped).
    pub cached_blocks: u32,
    /// KV blocks to copy `(src, dst)` before this step's forward.
    pub block_copies: Vec<(BlockId, BlockId)>,
}

/// One decode step of every running sequence, most recently admitted first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Ids in batch order (left empty with `PlanDetail::Minimal`).
    pub request_ids: Vec<Arc<str>>,
    /// Sequences in the batch.
    pub batch_size: u32,
    /// Virtual position every sequence writes its input token at (the batch
    /// tkv before this step; it is `tkv + 1` afterwards).
    pub tkv: u32,
    /// Each sequence's last generated token.
    pub input_ids: Vec<u32>,
    /// Position id of each input token (its index in the unpadded sequence).
    pub positions: Vec<u32>,
    /// KV slot each input token is written to.
    pub slot_mapping: Vec<i64>,
    /// Rectangular block tables, `width` entries per sequence, padded with
    /// the null block; row-major, `request_ids.len() * width` entries.
    pub block_table: Vec<BlockId>,
    pub width: u32,
    /// In-table index of each sequence's first real token.
    pub left_padding: Vec<u32>,
    /// In-table length of each sequence including this step's token: keys
    /// `left_padding[i]..current_tkv[i]` are attended to.
    pub current_tkv: Vec<u32>,
    /// KV blocks to copy `(src, dst)` before this step's forward.
    pub block_copies: Vec<(BlockId, BlockId)>,
}

impl DecodePlan {
    /// A plan of `batch_size` sequences writing at `tkv`, its vectors still empty
    /// (the policy fills what its detail asks for).
    pub fn empty(batch_size: u32, tkv: u32) -> Self {
        Self {
            request_ids: Vec::new(),
            batch_size,
            tkv,
            input_ids: Vec::new(),
            positions: Vec::new(),
            slot_mapping: Vec::new(),
            block_table: Vec::new(),
            width: 0,
            left_padding: Vec::new(),
            current_tkv: Vec::new(),
            block_copies: Vec::new(),
        }
    }

    /// Block table row of sequence `i`.
    pub fn block_table_row(&self, i: usize) -> &[BlockId] {
        let w = self.width as usize;
        &self.block_table[i * w..(i + 1) * w]
    }
}

/// What one step does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepPlan {
    Prefill(PrefillPlan),
    /// A prefill chunk (chunked policy).
    Chunk(ChunkPlan),
    Decode(DecodePlan),
    /// Nothing runs; the batch is empty (tkv 0).
    Idle,
}

impl StepPlan {
    /// Request ids in the order `update` expects their tokens. (The step that
    /// samples a beam search's first tokens takes one per beam: its id once
    /// here; `Scheduler::last_outputs` lists every sequence of a step.)
    pub fn request_ids(&self) -> Vec<&str> {
        match self {
            Self::Prefill(p) => vec![&*p.request_id],
            Self::Chunk(c) if c.is_last => vec![&*c.request_id],
            Self::Chunk(_) => Vec::new(),
            Self::Decode(d) => d.request_ids.iter().map(|s| &**s).collect(),
            Self::Idle => Vec::new(),
        }
    }

    /// The KV block copies the forward makes first (none for an idle step).
    pub fn block_copies_mut(&mut self) -> Option<&mut Vec<(BlockId, BlockId)>> {
        match self {
            Self::Prefill(p) => Some(&mut p.block_copies),
            Self::Chunk(c) => Some(&mut c.block_copies),
            Self::Decode(d) => Some(&mut d.block_copies),
            Self::Idle => None,
        }
    }

    /// Rows of logits this step's forward gives (a non-final chunk: none); the
    /// tokens `update` takes are as many, but a beam search's first step (its
    /// prefill or last chunk) takes one per beam from its one row.
    pub fn n_sequences(&self) -> usize {
        match self {
            Self::Prefill(_) => 1,
            Self::Chunk(c) => usize::from(c.is_last),
            Self::Decode(d) => d.batch_size as usize,
            Self::Idle => 0,
        }
    }
}
