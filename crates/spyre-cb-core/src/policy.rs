//! The interface between the scheduler and a scheduling policy: the state
//! every policy works on ([`Core`]) and what a policy decides ([`Rules`]).
//! The scheduler (`scheduler.rs`) owns one `Core` and one policy; the
//! policies (`continuous.rs`, `chunked.rs`) know this module only.

use crate::admission::Rejection;
use crate::config::SchedulerConfig;
use crate::error::CoreError;
use crate::kv::KvManager;
use crate::plan::StepPlan;
use crate::record::{ChunkedState, Counters};
use crate::request::Request;
use crate::requests::{Handle, RequestTable};

/// How much of the plan to build. Simulations only need the ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanDetail {
    /// Everything a model runner needs.
    Full,
    /// Request ids, tkv and shift only (tensors' worth of vectors left empty).
    IdsOnly,
    /// Kind, tkv and batch size only (decode ids left empty too).
    Minimal,
}

/// The state every policy works on.
#[derive(Clone, Debug)]
pub(crate) struct Core {
    pub cfg: SchedulerConfig,
    pub reqs: RequestTable,
    pub kv: KvManager,
    pub counters: Counters,
    pub last_rejection: Option<Rejection>,
}

/// What a scheduling policy decides; the [`Scheduler`] does the rest.
pub(crate) trait Rules {
    /// What a request needs to run alone in a fresh batch: the blocks it
    /// reserves and its largest batch x tkv (`validate` checks both against
    /// the limits, after the shared checks of id, length and `max_model_len`).
    fn alone(&self, cfg: &SchedulerConfig, prompt_len: u32, max_tokens: u32) -> (u64, u64);
    /// Blocks of a request that leaves return at the start of the next step
    /// (the continuous policy) rather than at once.
    fn defers_release(&self) -> bool;
    /// A request's generated tokens are appended to its token ids (the
    /// chunked policy hashes them into prefix-cache blocks); the continuous
    /// policy keeps only the last one.
    fn keeps_tokens(&self) -> bool;
    /// The batch tkv of the last step (0 when idle).
    fn tkv(&self) -> u32;
    /// Admits and plans one step (the gone requests are already forgotten):
    /// fills `core.reqs.outputs` with the sampling sequences in plan order.
    fn plan(&mut self, core: &mut Core, detail: PlanDetail) -> Result<StepPlan, CoreError>;
    /// The pending step ran: record its KV progress (before the tokens).
    fn commit(&mut self, core: &mut Core);
    /// The pending step failed: the requests to abort.
    fn victims(&mut self, core: &mut Core) -> Vec<Handle>;
    /// `h` leaves the batch (it is already out of `core.reqs.running`).
    fn leave(&mut self, h: Handle);
    /// `k` idle steps run at once.
    fn skip_idle(&mut self);
    /// Requests paused (hold blocks, neither waiting nor running).
    fn paused(&self) -> &[Handle] {
        &[]
    }
    /// Padding slots of the decode step just planned (of its batch x (tkv + 1)).
    fn decode_padding(&self, core: &Core) -> u64;
    /// The chunked policy's block-level observation.
    fn chunked_state(&self, _core: &Core) -> Option<ChunkedState> {
        None
    }
    /// The policy's bookkeeping invariants.
    fn check(&self, core: &Core) -> Result<(), String>;
    /// In-table index of the block a running request writes its next KV to
    /// (after the commit of the step that produced its last token).
    fn next_write_index(&self, r: &Request) -> u32;
    /// A beam search forked (or started): bring its reservation in line with
    /// the blocks its beams now hold (the chunked policy's reservation is
    /// what is still to allocate; the continuous policy's never changes).
    fn rebalance_beams(&self, _core: &mut Core, _head: Handle) {}
}

impl Core {
    /// Makes the other beams of beam search `head`, which was just admitted
    /// (it is in `running` and `outputs`): each a sequence right after it in
    /// both, under its id, reserving `reserved` blocks; `update` gives them
    /// the prompt's blocks (shared) with their first tokens.
    pub fn spawn_beams(&mut self, head: Handle, reserved: u32) {
        let width = self.reqs.get(head).beam_width;
        if width <= 1 {
            return;
        }
        let mut beams = Vec::with_capacity(width as usize - 1);
        for _ in 1..width {
            let mut r = Request::beam_of(self.reqs.get(head), head);
            r.reserved = reserved;
            self.kv.reserve(reserved);
            beams.push(self.reqs.insert_member(r));
        }
        for list in [&mut self.reqs.running, &mut self.reqs.outputs] {
            let at = list.iter().position(|&h| h == head).expect("the admitted request runs and samples") + 1;
            list.splice(at..at, beams.iter().copied());
        }
        self.reqs.get_mut(head).beams = beams;
    }
}
