//! The scheduler: one protocol over a request table, a KV manager and the
//! configured policy's rules.
//!
//! Protocol, once per step: [`Scheduler::schedule`] (forgets the requests
//! that left in the previous step, lets the policy admit and plan, and
//! returns the plan), the runner executes the plan, then
//! [`Scheduler::update`] records the sampled tokens and which requests
//! stopped ([`Scheduler::cancel`] closes a step that failed).
//! [`Scheduler::snapshot`] observes the state in between. Everything a
//! policy does not decide (ids, the queue, aborts, stop rules, finishing,
//! counters, observations) lives here once; a policy ([`Rules`]) admits,
//! plans and commits its plans' progress.

use std::sync::Arc;

use crate::admission::Rejection;
use crate::block_pool::BlockId;
use crate::chunked::Chunked;
use crate::config::{Policy, SchedulerConfig};
use crate::continuous::Continuous;
use crate::error::{CoreError, InvalidRequest, StateError};
use crate::kv::KvManager;
use crate::plan::StepPlan;
use crate::policy::{Core, Rules};
use crate::record::{ChunkedState, Counters, StepRecord};
use crate::request::{check_new_request, check_token_count, finish_of, FinishReason, Request, StopRule};
use crate::requests::{Handle, RequestRef, RequestTable};

pub use crate::policy::PlanDetail;

/// What `update` reports for the step it closes (every planned sequence got
/// its token, in plan order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Ids that finished in this step (max_tokens reached or stopped).
    pub finished: Vec<Arc<str>>,
    /// Why each of `finished` ended (same order): length or stop.
    pub finish_reasons: Vec<FinishReason>,
    /// The stop token id of each of `finished` that ended on one of its stop
    /// ids (EOS, length and stop flags give `None`).
    pub stop_tokens: Vec<Option<u32>>,
    /// Ids aborted: between steps since the last close (first), then by
    /// `cancel`, or by an abort that arrived while the step was in flight.
    pub aborted: Vec<Arc<str>>,
}

impl UpdateOutcome {
    pub fn clear(&mut self) {
        self.finished.clear();
        self.finish_reasons.clear();
        self.stop_tokens.clear();
        self.aborted.clear();
    }
}

/// Calls the configured policy's rules (static dispatch: the policies'
/// methods inline into the protocol's).
macro_rules! rules {
    ($rules:expr, $r:ident => $body:expr) => {
        match $rules {
            PolicyRules::Continuous($r) => $body,
            PolicyRules::Chunked($r) => $body,
        }
    };
}

#[derive(Clone, Debug)]
enum PolicyRules {
    Continuous(Continuous),
    Chunked(Box<Chunked>),
}

/// The scheduler of either policy (see the module docs).
#[derive(Clone, Debug)]
pub struct Scheduler {
    core: Core,
    rules: PolicyRules,
    pending: bool,
    /// What the last close reported aborted (so a caller that lost the
    /// outcome, e.g. to an interrupt, can still deliver every final output).
    last_aborted: Vec<Arc<str>>,
    /// KV block copies `(request, src, dst)` the next plan's forward makes
    /// first: beams forked onto their own copy of a block they shared.
    copies: Vec<(Handle, BlockId, BlockId)>,
    /// The copies the pending plan carries (a cancelled step gives them back).
    inflight: Vec<(Handle, BlockId, BlockId)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let (rules, caching) = match cfg.policy {
            Policy::Continuous => (PolicyRules::Continuous(Continuous::default()), false),
            Policy::Chunked(o) => (PolicyRules::Chunked(Box::new(Chunked::new(o))), o.prefix_caching),
        };
        let core = Core {
            kv: KvManager::new(cfg.available_blocks, caching),
            cfg,
            reqs: RequestTable::default(),
            counters: Counters::default(),
            last_rejection: None,
        };
        Self { core, rules, pending: false, last_aborted: Vec::new(), copies: Vec::new(), inflight: Vec::new() }
    }

    // ----- accessors -------------------------------------------------------

    pub fn config(&self) -> &SchedulerConfig {
        &self.core.cfg
    }
    /// Steps run so far.
    pub fn step(&self) -> u64 {
        self.core.counters.steps()
    }
    pub fn tkv(&self) -> u32 {
        rules!(&self.rules, r => r.tkv())
    }
    pub fn n_waiting(&self) -> usize {
        self.core.reqs.waiting.len()
    }
    pub fn n_running(&self) -> usize {
        self.core.reqs.running.len()
    }
    pub fn n_paused(&self) -> usize {
        rules!(&self.rules, r => r.paused()).len()
    }
    pub fn n_reserved_blocks(&self) -> u32 {
        self.core.kv.n_reserved()
    }
    pub fn n_unreserved_blocks(&self) -> u32 {
        self.core.kv.n_unreserved()
    }
    pub fn n_used_blocks(&self) -> u32 {
        self.core.kv.n_used()
    }
    /// Physical blocks a KV cache must hold (usable blocks + the null block).
    pub fn n_physical_blocks(&self) -> u32 {
        self.core.cfg.n_physical_blocks()
    }
    /// Event counters since the scheduler was built.
    pub fn counters(&self) -> Counters {
        self.core.counters
    }
    /// Between `schedule` and `update`/`cancel`.
    pub fn step_in_flight(&self) -> bool {
        self.pending
    }
    /// Requests waiting, running or paused, or aborted and not yet reported
    /// (the next step's outcome reports them).
    pub fn has_unfinished_requests(&self) -> bool {
        let reqs = &self.core.reqs;
        !reqs.waiting.is_empty() || !reqs.running.is_empty() || self.n_paused() > 0 || !reqs.unreported.is_empty()
    }
    /// Nothing queued, running or paused, and every block back in the pool.
    pub fn is_drained(&self) -> bool {
        !self.has_unfinished_requests() && self.core.kv.n_used() == 0
    }
    pub fn contains(&self, request_id: &str) -> bool {
        self.core.reqs.handle(request_id).is_some()
    }
    /// The ids the last `update` or `cancel` reported in `aborted`.
    pub fn last_aborted(&self) -> &[Arc<str>] {
        &self.last_aborted
    }
    /// Why the next prefill did not run in the last step.
    pub fn last_rejection(&self) -> Option<Rejection> {
        self.core.last_rejection
    }
    /// The KV manager (read only), for invariant checks.
    pub fn kv(&self) -> &KvManager {
        &self.core.kv
    }
    /// Padding slots of the decode step just planned.
    pub fn decode_padding(&self) -> u64 {
        rules!(&self.rules, r => r.decode_padding(&self.core))
    }
    /// Prompt blocks reused from the prefix cache by the requests holding
    /// blocks (their usable hits; 0 without caching).
    pub fn n_cached_blocks(&self) -> u32 {
        let reqs = &self.core.reqs;
        let holders = reqs.running.iter().chain(rules!(&self.rules, r => r.paused()));
        // (a beam search's hit counts once, not per beam)
        holders
            .map(|&h| reqs.get(h))
            .filter(|r| reqs.n_beam_searches == 0 || r.member_of.is_none())
            .map(|r| r.usable_hit)
            .sum()
    }
    /// The chunked policy's block-level observation (`None` under the continuous policy).
    pub fn snapshot_chunked(&self) -> Option<ChunkedState> {
        rules!(&self.rules, r => r.chunked_state(&self.core))
    }
    /// Full blocks of `prompt` this scheduler's prefix cache holds (0 without
    /// caching): what a request with this prompt would not recompute.
    pub fn cached_prefix_blocks(&self, prompt: &[u32]) -> u32 {
        let len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        self.core.kv.lookup_prefix(prompt, len).len() as u32
    }

    /// Tokens generated so far by a known request.
    pub fn generated(&self, request_id: &str) -> Option<u32> {
        self.core.reqs.handle(request_id).map(|h| self.core.reqs.get(h).generated)
    }

    /// Blocks held by a running or paused request, or (continuous policy)
    /// one whose blocks return at the start of the next step.
    pub fn request_blocks(&self, request_id: &str) -> Option<Vec<u32>> {
        let h = self.core.reqs.handle(request_id)?;
        let r = self.core.reqs.get(h);
        let holds = self.core.reqs.running.contains(&h)
            || rules!(&self.rules, r => r.paused()).contains(&h)
            || (self.core.reqs.gone.contains(&h) && !r.blocks.is_empty());
        holds.then(|| r.blocks.clone())
    }

    /// Checks the bookkeeping invariants; `Err` names the first one broken.
    /// (Used by the property tests; cheap enough to call every step.)
    pub fn check_invariants(&self) -> Result<(), String> {
        let c = &self.core;
        c.kv.check()?;
        // every block is held as often as its reference count says
        let mut holders = vec![0u32; c.cfg.available_blocks as usize + 1];
        let mut reserved = 0u32;
        let paused = rules!(&self.rules, r => r.paused());
        for &h in c.reqs.running.iter().chain(paused).chain(c.reqs.gone.iter()) {
            let r = c.reqs.get(h);
            reserved += r.reserved;
            for &b in &r.blocks {
                if b == crate::NULL_BLOCK || b > c.cfg.available_blocks {
                    return Err(format!("request {} holds invalid block {b}", r.id));
                }
                holders[b as usize] += 1;
            }
        }
        for (b, &n) in holders.iter().enumerate().skip(1) {
            if n != c.kv.ref_count(b as u32) {
                return Err(format!("block {b}: {n} holders but ref count {}", c.kv.ref_count(b as u32)));
            }
        }
        if reserved != c.kv.n_reserved() {
            return Err(format!("reserved sum {reserved} != counter {}", c.kv.n_reserved()));
        }
        if c.kv.n_reserved() > c.cfg.available_blocks {
            return Err(format!("reserved {} > n_blocks {}", c.kv.n_reserved(), c.cfg.available_blocks));
        }
        rules!(&self.rules, r => r.check(c))
    }

    // ----- requests --------------------------------------------------------

    /// Checks a request against the limits without adding it.
    pub fn validate(&self, request_id: &str, prompt_len: u32, max_tokens: u32) -> Result<(), InvalidRequest> {
        self.validate_beams(request_id, prompt_len, max_tokens, 1)
    }

    /// Checks a beam search of `width` beams against the limits without adding
    /// it: alone in a fresh batch, its beams must fit the batch, and their
    /// worst cases (each beam's as if it shared nothing) the pool and the
    /// volume limit.
    pub fn validate_beams(
        &self,
        request_id: &str,
        prompt_len: u32,
        max_tokens: u32,
        width: u32,
    ) -> Result<(), InvalidRequest> {
        let in_use = self.core.reqs.id_in_use(request_id);
        let cfg = &self.core.cfg;
        check_new_request(in_use, request_id, prompt_len, max_tokens, cfg.max_model_len)?;
        if width == 0 || width > cfg.max_num_seqs {
            return Err(InvalidRequest::BeamWidth { width, max_num_seqs: cfg.max_num_seqs });
        }

        let (needed, volume) = rules!(&self.rules, r => r.alone(cfg, prompt_len, max_tokens));
        let (needed, volume) = (needed * u64::from(width), volume * u64::from(width));
        if needed > u64::from(cfg.available_blocks) {
            return Err(InvalidRequest::TooManyBlocks { needed, available_blocks: cfg.available_blocks });
        }
        if volume > cfg.max_batch_tkv_limit {
            return Err(InvalidRequest::TooMuchVolume { volume, limit: cfg.max_batch_tkv_limit });
        }
        Ok(())
    }

    /// Queues a request with its prompt token ids.
    pub fn add_request(&mut self, request_id: &str, prompt: Vec<u32>, max_tokens: u32) -> Result<(), CoreError> {
        self.add_request_with(request_id, prompt, max_tokens, StopRule::default())
    }

    /// Queues a request whose sampled tokens the core checks against `stop`.
    pub fn add_request_with(
        &mut self,
        request_id: &str,
        prompt: Vec<u32>,
        max_tokens: u32,
        stop: StopRule,
    ) -> Result<(), CoreError> {
        self.add(request_id, 0, prompt, None, max_tokens, stop)
    }

    /// Queues a beam search of `width` beams over `prompt`: it is prefilled
    /// once; its first token forks it into `width` sequences under its id,
    /// which decode together and share blocks until their histories differ
    /// (`update_beams` says which beam each continues). It ends when its
    /// `max_tokens` are generated or a stop flag ends it (`stop` applies as
    /// for any request; a beam search usually gives none and decides itself).
    pub fn add_request_beams(
        &mut self,
        request_id: &str,
        prompt: Vec<u32>,
        max_tokens: u32,
        width: u32,
        stop: StopRule,
    ) -> Result<(), CoreError> {
        let len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        self.validate_beams(request_id, len, max_tokens, width)?;
        let mut r = Request::new(Arc::from(request_id), 0, prompt, len, max_tokens);
        r.stop = (!stop.is_empty()).then(|| Box::new(stop));
        r.beam_width = width;
        self.core.reqs.insert(r);
        Ok(())
    }

    /// [`Scheduler::add_request`] with a numeric `tag` the caller reads back
    /// through [`RequestRef::tag`] (cheaper than ids in hot loops).
    pub fn add_request_tokens_tagged(
        &mut self,
        request_id: &str,
        tag: u32,
        prompt: Vec<u32>,
        max_tokens: u32,
    ) -> Result<(), CoreError> {
        self.add(request_id, tag, prompt, None, max_tokens, StopRule::default())
    }

    /// Queues a token-less request (simulation): plans carry no input ids
    /// and it never hits the prefix cache.
    pub fn add_request_len(&mut self, request_id: &str, prompt_len: u32, max_tokens: u32) -> Result<(), CoreError> {
        self.add_request_tagged(request_id, 0, prompt_len, max_tokens)
    }

    /// A token-less request with a numeric `tag`.
    pub fn add_request_tagged(
        &mut self,
        request_id: &str,
        tag: u32,
        prompt_len: u32,
        max_tokens: u32,
    ) -> Result<(), CoreError> {
        self.add(request_id, tag, Vec::new(), Some(prompt_len), max_tokens, StopRule::default())
    }

    fn add(
        &mut self,
        request_id: &str,
        tag: u32,
        tokens: Vec<u32>,
        prompt_len: Option<u32>,
        max_tokens: u32,
        stop: StopRule,
    ) -> Result<(), CoreError> {
        let len = prompt_len.unwrap_or_else(|| u32::try_from(tokens.len()).unwrap_or(u32::MAX));
        self.validate(request_id, len, max_tokens)?;
        let mut r = Request::new(Arc::from(request_id), tag, tokens, len, max_tokens);
        r.stop = (!stop.is_empty()).then(|| Box::new(stop));
        self.core.reqs.insert(r);
        Ok(())
    }

    /// Aborts a waiting request (out of the queue at once) or a running or
    /// paused one (leaves the batch now; its blocks return at once, or under
    /// the continuous policy at the start of the next step). The outcome of
    /// the next step that closes (`update` or `cancel`) reports it in
    /// `aborted`; its id can be reused after the next step.
    ///
    /// While a step is in flight (between `schedule` and `update`) the abort
    /// is accepted and queued: it takes effect when that step closes, after
    /// its token was recorded, and that step's outcome reports it.
    pub fn abort(&mut self, request_id: &str) -> Result<(), CoreError> {
        let Some(h) = self.core.reqs.abortable(request_id) else {
            return Err(CoreError::UnknownRequest { request_id: request_id.to_owned() });
        };
        if self.pending {
            if !self.core.reqs.queued_aborts.contains(&h) {
                self.core.reqs.queued_aborts.push(h);
            }
            return Ok(());
        }
        let id = self.core.reqs.get(h).id.clone();
        self.abort_now(h);
        self.core.reqs.unreported.push(id);
        Ok(())
    }

    /// A waiting request leaves the queue, a running or paused one the batch;
    /// either id stays taken until the next step forgets it.
    fn abort_now(&mut self, h: Handle) {
        if self.core.reqs.take_waiting(h) {
            self.core.reqs.gone.push(h);
        } else {
            self.leave(h);
        }
    }

    /// A running or paused request leaves the batch (a beam search with all
    /// its beams, and the block copies it still had to make).
    fn leave(&mut self, h: Handle) {
        if self.core.reqs.n_beam_searches > 0 {
            for b in std::mem::take(&mut self.core.reqs.get_mut(h).beams) {
                self.leave_one(b);
            }
            self.copies.retain(|c| c.0 != h);
        }
        self.leave_one(h);
    }

    fn leave_one(&mut self, h: Handle) {
        let core = &mut self.core;
        core.reqs.running.retain(|&x| x != h);
        let defers = rules!(&mut self.rules, r => {
            r.leave(h);
            r.defers_release()
        });
        if !defers {
            let r = core.reqs.get_mut(h);
            let (blocks, reserved) = (std::mem::take(&mut r.blocks), std::mem::replace(&mut r.reserved, 0));
            core.kv.release(&blocks, reserved);
        }
        core.reqs.gone.push(h);
    }

    // ----- stepping --------------------------------------------------------

    /// Starts a step and returns its plan (full detail).
    pub fn schedule(&mut self) -> Result<StepPlan, CoreError> {
        self.schedule_with(PlanDetail::Full)
    }

    /// Starts a step: forgets the requests that left in the last one (their
    /// blocks return now if they have not yet), then the policy admits and
    /// plans.
    pub fn schedule_with(&mut self, detail: PlanDetail) -> Result<StepPlan, CoreError> {
        if self.pending {
            return Err(StateError::ScheduleWhilePending.into());
        }
        let core = &mut self.core;
        core.reqs.outputs.clear();
        core.reqs.finished.clear();
        core.last_rejection = None;
        Self::forget_gone(core);
        // (the plan is returned as the policy built it: no copy of the large enum)
        let mut planned = rules!(&mut self.rules, r => r.plan(core, detail));
        if let Ok(plan) = &mut planned {
            core.counters.count(plan);
            self.pending = true;
            if !self.copies.is_empty() {
                if let Some(copies) = plan.block_copies_mut() {
                    copies.extend(self.copies.iter().map(|&(_, src, dst)| (src, dst)));
                }
                self.inflight = std::mem::take(&mut self.copies);
            }
        }
        planned
    }

    #[inline]
    fn forget_gone(core: &mut Core) {
        for h in std::mem::take(&mut core.reqs.gone) {
            let r = core.reqs.remove(h);
            core.kv.release(&r.blocks, r.reserved);
        }
    }

    /// Runs `k` idle steps at once. Only when nothing is queued, running or
    /// holding blocks (every such step would be the same idle step).
    pub fn skip_idle_steps(&mut self, k: u64) {
        assert!(!self.pending && !self.has_unfinished_requests(), "idle steps need an empty scheduler");
        let core = &mut self.core;
        Self::forget_gone(core);
        core.reqs.outputs.clear();
        core.reqs.finished.clear();
        core.last_rejection = None;
        core.counters.idle_steps += k;
        rules!(&mut self.rules, r => r.skip_idle());
    }

    /// Closes the pending step with one sampled token per sampling sequence
    /// (plan order; none for a non-final chunk) and whether each stopped
    /// early (a stop string...). The core ends requests on their stop rule
    /// and at `max_tokens` without being told.
    pub fn update(&mut self, tokens: &[u32], stopped: &[bool]) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        self.update_into(tokens, stopped, &[], &mut outcome)?;
        Ok(outcome)
    }

    /// [`Scheduler::update`] of a step with beam searches: `parents[i]` is the
    /// sequence (an index into this step's sequences, of the same request)
    /// whose history sequence `i` continues with its token (`i` itself for a
    /// sequence that keeps its own; every sequence of a request that is not a
    /// beam search). A beam takes over its parent's blocks, sharing them; a
    /// block two beams would both write next is copied (the copy is made by
    /// the next plan's forward, `block_copies`). Empty: every sequence keeps
    /// its own (the first token of a beam search: every beam continues the prompt).
    pub fn update_beams(
        &mut self,
        tokens: &[u32],
        stopped: &[bool],
        parents: &[u32],
    ) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        self.update_into(tokens, stopped, parents, &mut outcome)?;
        Ok(outcome)
    }

    /// [`Scheduler::update_beams`] writing into `outcome` (cleared first).
    pub fn update_into(
        &mut self,
        tokens: &[u32],
        stopped: &[bool],
        parents: &[u32],
        outcome: &mut UpdateOutcome,
    ) -> Result<(), CoreError> {
        outcome.clear();
        if !self.pending {
            return Err(StateError::UpdateWithoutPlan.into());
        }
        check_token_count(self.core.reqs.outputs.len(), tokens, stopped)?;
        let forks = if parents.is_empty() && self.core.reqs.n_beam_searches == 0 {
            None // (no beam search: nothing to look at)
        } else {
            self.beam_parents(parents)?
        };
        self.pending = false;
        self.inflight.clear();
        outcome.aborted.append(&mut self.core.reqs.unreported);
        let keeps_tokens = rules!(&mut self.rules, r => {
            r.commit(&mut self.core);
            r.keeps_tokens()
        });
        if let Some(forks) = forks {
            self.fork_all(&forks)?;
        }
        // (a request's beam fields are read only when there are beam searches: they
        // sit on a cache line the step does not otherwise touch)
        let beams = self.core.reqs.n_beam_searches > 0;
        for (i, &token) in tokens.iter().enumerate() {
            let h = self.core.reqs.outputs[i];
            let stop = stopped.get(i).copied().unwrap_or(false);
            let done = {
                let r = self.core.reqs.get_mut(h);
                r.generated += 1;
                r.last_token = token;
                if keeps_tokens && r.has_tokens() {
                    r.tokens.push(token);
                }
                if beams && r.member_of.is_some() {
                    continue; // a beam ends with its request
                }
                finish_of(r.stop.as_deref(), token, r.generated, r.max_tokens, stop)
            };
            if let Some((why, stop_token)) = done {
                outcome.finished.push(self.core.reqs.get(h).id.clone());
                outcome.finish_reasons.push(why);
                outcome.stop_tokens.push(stop_token);
                self.core.reqs.finished.push(h);
                self.leave(h);
            }
        }
        self.apply_queued_aborts(outcome);
        self.last_aborted.clone_from(&outcome.aborted);
        Ok(())
    }

    /// Closes the pending step without tokens: every request of the plan is
    /// aborted and the others are untouched, so the scheduler is usable at
    /// once. For a runner that failed mid-step. Returns the aborted ids in
    /// `outcome.aborted` (those aborted between steps first, then the plan's
    /// in plan order).
    pub fn cancel(&mut self) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        if !self.pending {
            return Err(StateError::UpdateWithoutPlan.into());
        }
        self.pending = false;
        outcome.aborted.append(&mut self.core.reqs.unreported);
        let victims = rules!(&mut self.rules, r => r.victims(&mut self.core));
        self.core.reqs.outputs.clear();
        for h in victims {
            let h = self.core.reqs.group_of(h); // a beam is aborted with its request
            if self.core.reqs.gone.contains(&h) {
                continue;
            }
            outcome.aborted.push(self.core.reqs.get(h).id.clone());
            self.core.reqs.queued_aborts.retain(|&x| x != h);
            self.leave(h);
        }
        self.apply_queued_aborts(&mut outcome);
        // the failed forward may not have made the copies it carried: the searches that
        // still run get them again (their sources were not written since)
        for c in std::mem::take(&mut self.inflight) {
            if self.core.reqs.is_live(c.0) && !self.core.reqs.gone.contains(&c.0) {
                self.copies.push(c);
            }
        }
        self.last_aborted.clone_from(&outcome.aborted);
        Ok(outcome)
    }

    /// Forks every beam search of the step, then lets the policy bring their
    /// reservations in line.
    #[cold]
    #[inline(never)]
    fn fork_all(&mut self, parents: &[usize]) -> Result<(), CoreError> {
        self.fork(parents)?;
        let reqs = &self.core.reqs;
        let heads: Vec<Handle> = reqs.outputs.iter().copied().filter(|&h| reqs.get(h).beam_width > 1).collect();
        for h in heads {
            rules!(&self.rules, r => r.rebalance_beams(&mut self.core, h));
        }
        Ok(())
    }

    /// The effective parents of this step's sequences, checked before anything
    /// changes; `None` when no sequence belongs to a beam search.
    #[cold]
    #[inline(never)]
    fn beam_parents(&self, parents: &[u32]) -> Result<Option<Vec<usize>>, StateError> {
        let reqs = &self.core.reqs;
        let n = reqs.outputs.len();
        if parents.is_empty() && reqs.n_beam_searches == 0 {
            return Ok(None);
        }
        if parents.is_empty() && !reqs.outputs.iter().any(|&h| reqs.get(h).in_beam_search()) {
            return Ok(None);
        }
        let bad = |detail: String| StateError::BadBeamParents { detail };
        if !parents.is_empty() && parents.len() != n {
            return Err(bad(format!("{} parents for {n} sequences", parents.len())));
        }
        let mut out: Vec<usize> = (0..n).collect();
        for (i, &p) in parents.iter().enumerate() {
            let p = p as usize;
            if p >= n {
                return Err(bad(format!("parent {p} of sequence {i} is not one of the {n} sequences")));
            }
            if p != i && reqs.group_of(reqs.outputs[p]) != reqs.group_of(reqs.outputs[i]) {
                return Err(bad(format!(
                    "sequence {i} ({}) cannot continue sequence {p} ({}): another request",
                    reqs.get(reqs.outputs[i]).id,
                    reqs.get(reqs.outputs[p]).id
                )));
            }
            out[i] = p;
        }
        // a beam made for this step has no history yet: who continues it continues its
        // request's prompt
        for p in out.iter_mut() {
            let r = reqs.get(reqs.outputs[*p]);
            if let (Some(head), 0) = (r.member_of, r.generated) {
                *p = reqs
                    .outputs
                    .iter()
                    .position(|&x| x == head)
                    .ok_or_else(|| bad(format!("the new beams of {} sample without their request", r.id)))?;
            }
        }
        Ok(Some(out))
    }

    /// Gives each sequence of a beam search its parent's history: the
    /// parent's blocks, shared (one more holder each), the old ones dropped;
    /// then a block two beams would both write next is copied for all but
    /// the first (the copy is made by the next plan's forward).
    fn fork(&mut self, parents: &[usize]) -> Result<(), CoreError> {
        let core = &mut self.core;
        let reqs = &core.reqs;
        let rows: Vec<usize> = (0..parents.len()).filter(|&i| reqs.get(reqs.outputs[i]).in_beam_search()).collect();
        if rows.iter().all(|&i| parents[i] == i) {
            return Ok(());
        }
        // the histories before the fork (a parent may itself take another's)
        let before: Vec<Request> = rows.iter().map(|&i| reqs.get(reqs.outputs[i]).clone()).collect();
        for &i in &rows {
            let k = rows.iter().position(|&r| r == parents[i]).expect("checked: a beam's parent is a beam");
            let parent = &before[k];
            for &b in &parent.blocks {
                core.kv.hold(b);
            }
            let h = core.reqs.outputs[i];
            core.reqs.get_mut(h).continue_from(parent, parent.blocks.clone());
        }
        for r in &before {
            for &b in &r.blocks {
                core.kv.drop_one(b);
            }
        }
        // copy on write: the block a beam writes next, when an earlier beam holds it too
        let mut kept: Vec<BlockId> = Vec::new();
        let mut copies = Vec::new();
        for &i in &rows {
            let h = core.reqs.outputs[i];
            let r = core.reqs.get(h);
            let w = rules!(&self.rules, p => p.next_write_index(r)) as usize;
            if let Some(&b) = r.blocks.get(w) {
                if core.kv.ref_count(b) > 1 {
                    if kept.contains(&b) {
                        copies.push((h, w, b));
                    } else {
                        kept.push(b);
                    }
                }
            }
        }
        core.kv.ensure_free(copies.len() as u32)?;
        for (h, w, b) in copies {
            let d = core.kv.allocate();
            core.kv.drop_one(b);
            core.reqs.get_mut(h).blocks[w] = d;
            self.copies.push((core.reqs.group_of(h), b, d));
        }
        Ok(())
    }

    fn apply_queued_aborts(&mut self, outcome: &mut UpdateOutcome) {
        for h in std::mem::take(&mut self.core.reqs.queued_aborts) {
            if self.core.reqs.gone.contains(&h) {
                continue; // finished in this very step: it ends as finished
            }
            outcome.aborted.push(self.core.reqs.get(h).id.clone());
            self.abort_now(h);
        }
    }

    // ----- observation -----------------------------------------------------

    /// Waiting requests in queue order.
    pub fn waiting(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.core.reqs.waiting.iter().map(|&h| self.core.reqs.view(h))
    }
    /// Running requests in observation order (continuous: most recently
    /// admitted first).
    pub fn running(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.core.reqs.running.iter().map(|&h| self.core.reqs.view(h))
    }
    /// Paused requests (chunked policy with decode pausing).
    pub fn paused(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        rules!(&self.rules, r => r.paused()).iter().map(|&h| self.core.reqs.view(h))
    }
    /// Requests that produced a token in the last step (during a step: the
    /// sequences that will).
    pub fn last_outputs(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.core.reqs.outputs.iter().map(|&h| self.core.reqs.view(h))
    }
    /// Requests that finished in the last step.
    pub fn last_finished(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.core.reqs.finished.iter().map(|&h| self.core.reqs.view(h))
    }

    /// The current observation (chunk-only fields under the chunked policy).
    pub fn snapshot(&self) -> StepRecord {
        let reqs = &self.core.reqs;
        StepRecord {
            step: self.step(),
            tkv: self.tkv(),
            waiting: reqs.waiting.iter().map(|&h| reqs.get(h).id.to_string()).collect(),
            running: reqs.names(&reqs.running),
            request_outputs: reqs.names(&reqs.outputs),
            finished_requests: reqs.names(&reqs.finished),
            n_reserved_blocks: self.core.kv.n_reserved(),
            n_used_blocks: self.core.kv.n_used(),
            chunked: rules!(&self.rules, r => r.chunked_state(&self.core)).map(Box::new),
        }
    }
}
