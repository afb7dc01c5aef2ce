//! What is observed after a step, for both policies: the published step
//! traces compare these fields.

use crate::block_pool::BlockId;
use crate::plan::StepPlan;

/// One observation of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StepRecord {
    pub step: u64,
    pub tkv: u32,
    /// Waiting ids in queue order.
    pub waiting: Vec<String>,
    /// Running ids in observation order (continuous: most recently admitted first).
    pub running: Vec<String>,
    /// Ids that produced a token in the last step (same order as running).
    pub request_outputs: Vec<String>,
    /// Ids that finished in the last step.
    pub finished_requests: Vec<String>,
    /// Blocks reserved by admitted requests (what counts is the policy's: see `kv`).
    pub n_reserved_blocks: u32,
    /// Distinct blocks allocated.
    pub n_used_blocks: u32,
    /// The chunked policy's block-level state (`None` under the continuous policy).
    pub chunked: Option<Box<ChunkedState>>,
}

/// The fields only the chunked policy observes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChunkedState {
    /// Paused requests (in neither waiting nor running).
    pub paused: Vec<String>,
    /// Sum over requests holding blocks of their usable (chunk-aligned) hit blocks.
    pub n_cached_blocks: u32,
    /// Requests whose usable hit exceeds their computed tokens (always 0
    /// here: a prefill starts right after its usable hit).
    pub n_prefix_hits: u32,
    /// Block table of every request holding one (running order, then paused).
    pub block_tables: Vec<(String, Vec<BlockId>)>,
    /// Reference count of every block some request holds (ascending ids).
    pub block_ref_count: Vec<(BlockId, u32)>,
    /// The last step's prefill chunk, block by block (0 = null block).
    pub prefill_slot_mappings: Vec<(String, Vec<u32>)>,
}

/// Event counters of a scheduler since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Net increases of the number of paused requests, summed over steps.
    pub pause_events: u64,
    /// Net decreases of the number of paused requests, summed over steps.
    pub resume_events: u64,
    /// Steps that ran a prefill or a prefill chunk.
    pub prefill_steps: u64,
    pub decode_steps: u64,
    pub idle_steps: u64,
    /// Prompt blocks whose prefill was skipped thanks to the prefix cache.
    pub prefix_cached_blocks: u64,
    /// Requests that started with a usable prefix-cache hit.
    pub prefix_hit_requests: u64,
}

impl Counters {
    /// Steps run so far.
    pub fn steps(&self) -> u64 {
        self.prefill_steps + self.decode_steps + self.idle_steps
    }
    pub(crate) fn count(&mut self, plan: &StepPlan) {
        match plan {
            StepPlan::Prefill(_) | StepPlan::Chunk(_) => self.prefill_steps += 1,
            StepPlan::Decode(_) => self.decode_steps += 1,
            StepPlan::Idle => self.idle_steps += 1,
        }
    }
}
