//! The scheduler: waiting queue, running batch, block pool and the shared tkv.
//!
//! Protocol, once per step: [`Scheduler::schedule`] (frees the blocks of the
//! requests that finished in the previous step, drops whole blocks of left
//! padding common to every running sequence, admits at most one waiting
//! request, allocates blocks and returns the plan), the runner executes the
//! plan, then [`Scheduler::update`] records the sampled tokens and which
//! requests stopped. [`Scheduler::snapshot`] observes the state in between.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::admission::{self, Admission, BatchView, Rejection};
use crate::block_pool::{BlockPool, NULL_BLOCK};
use crate::config::{SchedulerConfig, BLOCK_SIZE};
use crate::error::{CoreError, InvalidRequest, StateError};
use crate::plan::{DecodePlan, PrefillPlan, StepPlan};
use crate::request::{check_new_request, check_token_count, finish_of, FinishReason, Request, StopRule};
use crate::trace::StepRecord;

type Handle = u32;

/// A request as the observation accessors show it: its id and the caller's
/// numeric tag (simulations tag each request with its index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRef<'a> {
    pub id: &'a str,
    pub tag: u32,
}

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
    /// Ids aborted when the step closed: by `cancel`, or by an abort that
    /// arrived while the step was in flight.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    Idle,
    Prefill,
    Decode,
}

#[derive(Clone, Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    /// Request arena indexed by handle (`None`: a free handle).
    arena: Vec<Option<Request>>,
    free_handles: Vec<Handle>,
    ids: HashMap<Arc<str>, Handle>,
    waiting: VecDeque<Handle>,
    /// Admission order, oldest first (observations list it reversed).
    running: Vec<Handle>,
    tkv: u32,
    n_reserved: u32,
    /// Finished or aborted running requests whose blocks return to the pool
    /// at the start of the next step.
    to_free: Vec<Handle>,
    /// Handles of the sequences of the current step, plan order: after
    /// `update`, those that produced a token (alive until the next step).
    outputs: Vec<Handle>,
    finished: Vec<Handle>,
    step: u64,
    /// Reused buffers (no allocation per step).
    scratch_remaining: Vec<u32>,
    scratch_ends: Vec<u64>,
    pending: Pending,
    /// Aborts asked for while a step was in flight, applied when it closes.
    queued_aborts: Vec<Handle>,
    last_rejection: Option<Rejection>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let pool = BlockPool::new(cfg.available_blocks);
        Self {
            cfg,
            pool,
            arena: Vec::new(),
            free_handles: Vec::new(),
            ids: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            tkv: 0,
            n_reserved: 0,
            to_free: Vec::new(),
            outputs: Vec::new(),
            finished: Vec::new(),
            step: 0,
            pending: Pending::None,
            queued_aborts: Vec::new(),
            last_rejection: None,
            scratch_remaining: Vec::new(),
            scratch_ends: Vec::new(),
        }
    }

    // ----- accessors -------------------------------------------------------

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    /// Steps run so far.
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn tkv(&self) -> u32 {
        self.tkv
    }
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn n_running(&self) -> usize {
        self.running.len()
    }
    pub fn n_reserved_blocks(&self) -> u32 {
        self.n_reserved
    }
    pub fn n_unreserved_blocks(&self) -> u32 {
        self.cfg.available_blocks - self.n_reserved
    }
    pub fn n_used_blocks(&self) -> u32 {
        self.pool.n_used()
    }
    /// Physical blocks a KV cache must hold (usable blocks + the null block).
    pub fn n_physical_blocks(&self) -> u32 {
        self.pool.n_physical_blocks()
    }
    /// Between `schedule` and `update`/`cancel`.
    pub fn step_in_flight(&self) -> bool {
        self.pending != Pending::None
    }
    /// Requests waiting or running.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }
    /// Nothing queued, running or waiting to be freed: the pool is whole.
    pub fn is_drained(&self) -> bool {
        !self.has_unfinished_requests() && self.to_free.is_empty()
    }
    pub fn contains(&self, request_id: &str) -> bool {
        self.ids.contains_key(request_id)
    }
    /// Why the head of the waiting queue was not admitted in the last step.
    pub fn last_rejection(&self) -> Option<Rejection> {
        self.last_rejection
    }
    /// The block pool (read only), for invariant checks.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Left-padding slots of the running batch (virtual, fully padded blocks
    /// included): the padding share of a decode step's `batch x (tkv + 1)`.
    pub fn batch_padding(&self) -> u64 {
        self.running.iter().map(|&h| u64::from(self.req(h).left_pad)).sum()
    }

    /// Checks the bookkeeping invariants; `Err` names the first one broken.
    /// (Used by the property tests; cheap enough to call every step.)
    pub fn check_invariants(&self) -> Result<(), String> {
        let cfg = &self.cfg;
        if self.n_reserved > cfg.available_blocks {
            return Err(format!("reserved {} > n_blocks {}", self.n_reserved, cfg.available_blocks));
        }
        if self.tkv > cfg.max_model_len {
            return Err(format!("tkv {} > max_model_len {}", self.tkv, cfg.max_model_len));
        }
        let mut seen = vec![false; cfg.available_blocks as usize + 1];
        let mut reserved = 0u32;
        let mut used = 0u32;
        for &h in self.running.iter().chain(self.to_free.iter()) {
            let r = self.req(h);
            reserved += r.reserved;
            if r.blocks.len() as u32 > r.reserved {
                return Err(format!("request {}: {} blocks used > {} reserved", r.id, r.blocks.len(), r.reserved));
            }
            for &b in &r.blocks {
                if b == NULL_BLOCK || b > cfg.available_blocks {
                    return Err(format!("request {} holds invalid block {b}", r.id));
                }
                if std::mem::replace(&mut seen[b as usize], true) {
                    return Err(format!("block {b} owned twice (request {})", r.id));
                }
                if !self.pool.is_allocated(b) {
                    return Err(format!("block {b} of request {} is not allocated in the pool", r.id));
                }
                used += 1;
            }
        }
        for &h in &self.running {
            let r = self.req(h);
            if r.left_pad > self.tkv {
                return Err(format!("request {}: left padding {} > tkv {}", r.id, r.left_pad, self.tkv));
            }
            let real = self.tkv - r.left_pad;
            // prompt tokens plus every generated token but the newest are in the cache
            if real != r.prompt_len + r.generated - 1 {
                return Err(format!(
                    "request {}: {} real positions but {} prompt + {} generated",
                    r.id, real, r.prompt_len, r.generated
                ));
            }
            let need = self.tkv.div_ceil(BLOCK_SIZE) - r.fully_padded_blocks();
            if r.blocks.len() as u32 != need {
                return Err(format!("request {}: {} blocks for {need} needed", r.id, r.blocks.len()));
            }
        }
        if reserved != self.n_reserved {
            return Err(format!("reserved sum {reserved} != counter {}", self.n_reserved));
        }
        if used != self.pool.n_used() || self.pool.n_used() + self.pool.n_free() != cfg.available_blocks {
            return Err(format!(
                "blocks: {used} owned, pool says {} used + {} free of {}",
                self.pool.n_used(),
                self.pool.n_free(),
                cfg.available_blocks
            ));
        }
        Ok(())
    }

    /// Blocks held by a running request or one that finished in the last
    /// step (its blocks return at the start of the next); `None` otherwise.
    pub fn request_blocks(&self, request_id: &str) -> Option<Vec<u32>> {
        let h = *self.ids.get(request_id)?;
        if !self.running.contains(&h) && !self.to_free.contains(&h) {
            return None;
        }
        Some(self.req(h).blocks.clone())
    }

    fn req(&self, h: Handle) -> &Request {
        self.arena[h as usize].as_ref().expect("live handle")
    }
    fn req_mut(&mut self, h: Handle) -> &mut Request {
        self.arena[h as usize].as_mut().expect("live handle")
    }

    // ----- requests --------------------------------------------------------

    /// Checks a request against the limits without adding it.
    pub fn validate(&self, request_id: &str, prompt_len: u32, max_tokens: u32) -> Result<(), InvalidRequest> {
        let in_use = self.ids.get(request_id).map(|h| self.to_free.contains(h));
        check_new_request(in_use, request_id, prompt_len, max_tokens, self.cfg.max_model_len)?;
        let start = admission::new_batch_tkv(&self.cfg, prompt_len, max_tokens);
        let needed = admission::reserved_blocks(start, prompt_len, max_tokens);
        if needed > u64::from(self.cfg.available_blocks) {
            return Err(InvalidRequest::TooManyBlocks { needed, available_blocks: self.cfg.available_blocks });
        }
        let volume = u64::from(start) + u64::from(max_tokens) - 1;
        if volume > self.cfg.max_batch_tkv_limit {
            return Err(InvalidRequest::TooMuchVolume { volume, limit: self.cfg.max_batch_tkv_limit });
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
        let len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        self.validate(request_id, len, max_tokens)?;
        let mut r = Request::new(Arc::from(request_id), prompt, len, max_tokens);
        r.stop = (!stop.is_empty()).then(|| Box::new(stop));
        self.insert(r);
        Ok(())
    }

    /// Queues a token-less request (simulation): plans carry no input ids.
    pub fn add_request_len(&mut self, request_id: &str, prompt_len: u32, max_tokens: u32) -> Result<(), CoreError> {
        self.add_request_tagged(request_id, 0, prompt_len, max_tokens)
    }

    /// A token-less request with a numeric `tag` the caller reads back through
    /// [`RequestRef::tag`] (cheaper than ids in hot loops).
    pub fn add_request_tagged(
        &mut self,
        request_id: &str,
        tag: u32,
        prompt_len: u32,
        max_tokens: u32,
    ) -> Result<(), CoreError> {
        self.validate(request_id, prompt_len, max_tokens)?;
        let mut r = Request::new(Arc::from(request_id), Vec::new(), prompt_len, max_tokens);
        r.tag = tag;
        self.insert(r);
        Ok(())
    }

    fn insert(&mut self, req: Request) {
        let id = req.id.clone();
        let h = match self.free_handles.pop() {
            Some(h) => {
                self.arena[h as usize] = Some(req);
                h
            }
            None => {
                self.arena.push(Some(req));
                (self.arena.len() - 1) as Handle
            }
        };
        self.ids.insert(id, h);
        self.waiting.push_back(h);
    }

    fn remove(&mut self, h: Handle) -> Request {
        let r = self.arena[h as usize].take().expect("live handle");
        self.ids.remove(&r.id);
        self.free_handles.push(h);
        r
    }

    /// Aborts a waiting request (gone at once) or a running one (leaves the
    /// batch now; its blocks return to the pool at the start of the next step).
    ///
    /// While a step is in flight (between `schedule` and `update`) the abort
    /// is accepted and queued: it takes effect when that step closes, after
    /// its token was recorded, and `update` reports the request as aborted.
    pub fn abort(&mut self, request_id: &str) -> Result<(), CoreError> {
        let h = match self.ids.get(request_id) {
            Some(&h) if !self.to_free.contains(&h) => h,
            _ => return Err(CoreError::UnknownRequest { request_id: request_id.to_owned() }),
        };
        if self.pending != Pending::None {
            if !self.queued_aborts.contains(&h) {
                self.queued_aborts.push(h);
            }
            return Ok(());
        }
        self.abort_now(h);
        Ok(())
    }

    fn abort_now(&mut self, h: Handle) {
        if let Some(pos) = self.waiting.iter().position(|&w| w == h) {
            self.waiting.remove(pos);
            self.remove(h);
        } else {
            self.running.retain(|&x| x != h);
            self.to_free.push(h);
        }
    }

    // ----- stepping --------------------------------------------------------

    /// Starts a step and returns its plan (full detail).
    pub fn schedule(&mut self) -> Result<StepPlan, CoreError> {
        self.schedule_with(PlanDetail::Full)
    }

    /// Starts a step: frees the blocks of last step's finished requests,
    /// reduces common left padding, admits the head of the queue if it fits,
    /// allocates the blocks the step writes to and returns the plan.
    pub fn schedule_with(&mut self, detail: PlanDetail) -> Result<StepPlan, CoreError> {
        if self.pending != Pending::None {
            return Err(StateError::ScheduleWhilePending.into());
        }
        self.step += 1;
        self.outputs.clear();
        self.finished.clear();
        self.release_finished();
        self.reduce_left_padding();

        self.last_rejection = None;
        if let Some(&head) = self.waiting.front() {
            let mut remaining = std::mem::take(&mut self.scratch_remaining);
            remaining.clear();
            remaining.extend(self.running.iter().map(|&h| self.req(h).remaining()));
            let view = BatchView {
                tkv: self.tkv,
                running_remaining: &remaining,
                n_unreserved_blocks: self.n_unreserved_blocks(),
                admitted_this_step: 0,
            };
            let (pl, mt) = {
                let r = self.req(head);
                (r.prompt_len, r.max_tokens)
            };
            let decision = admission::can_schedule_with(&self.cfg, &view, pl, mt, &mut self.scratch_ends);
            self.scratch_remaining = remaining;
            match decision {
                Ok(adm) => {
                    self.waiting.pop_front();
                    let plan = self.prefill(head, adm, detail)?;
                    self.outputs.push(head);
                    self.pending = Pending::Prefill;
                    return Ok(StepPlan::Prefill(plan));
                }
                Err(why) => self.last_rejection = Some(why),
            }
        }
        if self.running.is_empty() {
            self.tkv = 0;
            self.pending = Pending::Idle;
            return Ok(StepPlan::Idle);
        }
        let plan = self.decode(detail)?;
        self.outputs.extend(self.running.iter().rev().copied());
        self.pending = Pending::Decode;
        Ok(StepPlan::Decode(plan))
    }

    /// Runs `k` idle steps at once. Only when nothing is queued, running or
    /// waiting to be freed (every such step would be the same idle step).
    pub fn skip_idle_steps(&mut self, k: u64) {
        assert!(self.is_drained() && self.pending == Pending::None, "idle steps need an empty scheduler");
        self.step += k;
        self.tkv = 0;
        self.outputs.clear();
        self.finished.clear();
        self.last_rejection = None;
    }

    fn release_finished(&mut self) {
        for h in std::mem::take(&mut self.to_free) {
            let r = self.remove(h);
            for b in r.blocks {
                let ok = self.pool.free(b);
                debug_assert!(ok, "block {b} freed twice");
            }
            self.n_reserved -= r.reserved;
        }
        if self.running.is_empty() {
            self.tkv = 0;
        }
    }

    fn reduce_left_padding(&mut self) {
        let Some(min_fp) = self.running.iter().map(|&h| self.req(h).fully_padded_blocks()).min() else {
            return;
        };
        if min_fp == 0 {
            return;
        }
        let cut = min_fp * BLOCK_SIZE;
        for i in 0..self.running.len() {
            let h = self.running[i];
            self.req_mut(h).left_pad -= cut;
        }
        self.tkv -= cut;
    }

    /// Fails (before anything is changed) when the pool cannot give `n`
    /// blocks. Reservations make that impossible; this keeps a bug from
    /// leaving the state half-changed.
    fn ensure_free(&self, n: u32) -> Result<(), CoreError> {
        if self.pool.n_free() < n {
            return Err(StateError::PoolExhausted.into());
        }
        Ok(())
    }

    fn allocate(&mut self) -> u32 {
        self.pool.allocate().expect("ensure_free checked the pool first")
    }

    fn prefill(&mut self, h: Handle, adm: Admission, detail: PlanDetail) -> Result<PrefillPlan, CoreError> {
        // decide, then mutate: every check before the first change
        let prompt_len = self.req(h).prompt_len;
        let fp = (adm.tkv - prompt_len) / BLOCK_SIZE;
        self.ensure_free(adm.tkv.div_ceil(BLOCK_SIZE) - fp)?;
        if adm.shift > 0 {
            for i in 0..self.running.len() {
                let rh = self.running[i];
                self.req_mut(rh).left_pad += adm.shift;
            }
        }
        self.tkv = adm.tkv;
        let tkv = adm.tkv;
        let (pl, left_pad) = {
            let r = self.req(h);
            (r.prompt_len, tkv - r.prompt_len)
        };
        let fp = left_pad / BLOCK_SIZE;
        let in_left = left_pad - fp * BLOCK_SIZE;
        let n_alloc = tkv.div_ceil(BLOCK_SIZE) - fp;
        let input_len = n_alloc * BLOCK_SIZE;
        let right = input_len - in_left - pl;
        let mut blocks = Vec::with_capacity(n_alloc as usize);
        for _ in 0..n_alloc {
            blocks.push(self.allocate());
        }
        self.n_reserved += adm.reserved;
        let prompt = {
            let r = self.req_mut(h);
            r.left_pad = left_pad;
            r.reserved = adm.reserved;
            r.blocks = blocks.clone();
            std::mem::take(&mut r.prompt)
        };
        self.running.push(h);

        let full = detail == PlanDetail::Full;
        let mut input_ids = Vec::new();
        let mut positions = Vec::new();
        let mut slot_mapping = Vec::new();
        if full {
            if !prompt.is_empty() {
                input_ids.reserve(input_len as usize);
                input_ids.resize(in_left as usize, 0);
                input_ids.extend_from_slice(&prompt);
                input_ids.resize(input_len as usize, 0);
            }
            positions.reserve(input_len as usize);
            positions.resize(in_left as usize, 0);
            positions.extend(0..pl);
            positions.resize(input_len as usize, 0);
            slot_mapping = (0..input_len)
                .map(|i| {
                    i64::from(blocks[(i / BLOCK_SIZE) as usize]) * i64::from(BLOCK_SIZE) + i64::from(i % BLOCK_SIZE)
                })
                .collect();
        }
        Ok(PrefillPlan {
            request_id: self.req(h).id.clone(),
            tkv,
            tkv_shift: adm.shift,
            new_batch: adm.new_batch,
            prompt_len: pl,
            left_padding: in_left,
            right_padding: right,
            input_ids,
            positions,
            slot_mapping,
            block_table: if full { blocks } else { Vec::new() },
            logits_index: in_left + pl - 1,
        })
    }

    fn decode(&mut self, detail: PlanDetail) -> Result<DecodePlan, CoreError> {
        let pos = self.tkv;
        let n = self.running.len();
        // decide, then mutate: the sequences that start a new block this step
        let new_blocks = self
            .running
            .iter()
            .filter(|&&h| {
                let r = self.req(h);
                pos / BLOCK_SIZE - r.fully_padded_blocks() >= r.blocks.len() as u32
            })
            .count();
        self.ensure_free(new_blocks as u32)?;
        let full = detail == PlanDetail::Full;
        let ids = detail != PlanDetail::Minimal;
        let mut plan = DecodePlan {
            request_ids: Vec::with_capacity(if ids { n } else { 0 }),
            batch_size: n as u32,
            tkv: pos,
            input_ids: Vec::new(),
            positions: Vec::new(),
            slot_mapping: Vec::new(),
            block_table: Vec::new(),
            width: 0,
            left_padding: Vec::new(),
            current_tkv: Vec::new(),
        };
        if full {
            plan.input_ids.reserve(n);
            plan.positions.reserve(n);
            plan.slot_mapping.reserve(n);
            plan.left_padding.reserve(n);
            plan.current_tkv.reserve(n);
        }
        for i in (0..n).rev() {
            let h = self.running[i];
            let (fp, nb) = {
                let r = self.req(h);
                (r.fully_padded_blocks(), r.blocks.len() as u32)
            };
            let idx = pos / BLOCK_SIZE - fp;
            if idx >= nb {
                debug_assert_eq!(idx, nb, "a decode never skips a block");
                let b = self.allocate();
                let r = self.req_mut(h);
                debug_assert!(r.blocks.len() < r.reserved as usize, "allocation beyond reservation");
                r.blocks.push(b);
            }
            let r = self.req(h);
            if ids {
                plan.request_ids.push(r.id.clone());
            }
            if full {
                let base = fp * BLOCK_SIZE;
                plan.input_ids.push(r.last_token);
                plan.positions.push(pos - r.left_pad);
                plan.slot_mapping
                    .push(i64::from(r.blocks[idx as usize]) * i64::from(BLOCK_SIZE) + i64::from(pos % BLOCK_SIZE));
                plan.left_padding.push(r.left_pad - base);
                plan.current_tkv.push(pos + 1 - base);
            }
        }
        if full {
            let width = self.running.iter().map(|&h| self.req(h).blocks.len()).max().unwrap_or(0);
            plan.width = width as u32;
            plan.block_table.reserve(width * n);
            for i in (0..n).rev() {
                let r = self.req(self.running[i]);
                plan.block_table.extend_from_slice(&r.blocks);
                plan.block_table.extend(std::iter::repeat_n(NULL_BLOCK, width - r.blocks.len()));
            }
        }
        Ok(plan)
    }

    /// Closes the pending step with one sampled token per sequence (plan
    /// order) and whether each sequence stopped early (EOS, stop string...).
    /// Requests that reach `max_tokens` finish without being told.
    pub fn update(&mut self, tokens: &[u32], stopped: &[bool]) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        self.update_into(tokens, stopped, &mut outcome)?;
        Ok(outcome)
    }

    /// [`Scheduler::update`] writing the finished ids into `outcome` (cleared first).
    pub fn update_into(
        &mut self,
        tokens: &[u32],
        stopped: &[bool],
        outcome: &mut UpdateOutcome,
    ) -> Result<(), CoreError> {
        outcome.clear();
        if self.pending == Pending::None {
            return Err(StateError::UpdateWithoutPlan.into());
        }
        check_token_count(self.outputs.len(), tokens, stopped)?;
        if self.pending == Pending::Decode {
            self.tkv += 1;
        }
        self.pending = Pending::None;
        for (i, &token) in tokens.iter().enumerate() {
            let h = self.outputs[i];
            let stop = stopped.get(i).copied().unwrap_or(false);
            let r = self.req_mut(h);
            r.generated += 1;
            r.last_token = token;
            if let Some((why, stop_token)) = finish_of(r.stop.as_deref(), token, r.generated, r.max_tokens, stop) {
                let id = r.id.clone();
                self.running.retain(|&x| x != h);
                self.to_free.push(h);
                self.finished.push(h);
                outcome.finished.push(id);
                outcome.finish_reasons.push(why);
                outcome.stop_tokens.push(stop_token);
            }
        }
        self.apply_queued_aborts(outcome);
        Ok(())
    }

    /// Closes the pending step without tokens: every request of the plan is
    /// aborted (its blocks return at the start of the next step) and the
    /// others are untouched, so the scheduler is usable at once. For a runner
    /// that failed mid-step. Returns the aborted ids (plan order) in
    /// `outcome.aborted`.
    pub fn cancel(&mut self) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        if self.pending == Pending::None {
            return Err(StateError::UpdateWithoutPlan.into());
        }
        self.pending = Pending::None;
        for h in std::mem::take(&mut self.outputs) {
            let id = self.req(h).id.clone();
            self.running.retain(|&x| x != h);
            self.to_free.push(h);
            self.queued_aborts.retain(|&x| x != h);
            outcome.aborted.push(id);
        }
        self.apply_queued_aborts(&mut outcome);
        Ok(outcome)
    }

    fn apply_queued_aborts(&mut self, outcome: &mut UpdateOutcome) {
        if self.queued_aborts.is_empty() {
            return;
        }
        for h in std::mem::take(&mut self.queued_aborts) {
            if self.to_free.contains(&h) {
                continue; // finished in this very step: it ends as finished
            }
            outcome.aborted.push(self.req(h).id.clone());
            self.abort_now(h);
        }
    }

    fn view(&self, h: Handle) -> RequestRef<'_> {
        let r = self.req(h);
        RequestRef { id: &r.id, tag: r.tag }
    }
    /// Waiting requests in queue order.
    pub fn waiting(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.waiting.iter().map(|&h| self.view(h))
    }
    /// Running requests, most recently admitted first.
    pub fn running(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.running.iter().rev().map(|&h| self.view(h))
    }
    /// Requests that produced a token in the last step.
    pub fn last_outputs(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.outputs.iter().map(|&h| self.view(h))
    }
    /// Requests that finished in the last step.
    pub fn last_finished(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.finished.iter().map(|&h| self.view(h))
    }

    /// The current observation.
    pub fn snapshot(&self) -> StepRecord {
        StepRecord {
            step: self.step,
            tkv: self.tkv,
            waiting: self.waiting().map(|r| r.id.to_owned()).collect(),
            running: self.running().map(|r| r.id.to_owned()).collect(),
            request_outputs: self.last_outputs().map(|r| r.id.to_owned()).collect(),
            finished_requests: self.last_finished().map(|r| r.id.to_owned()).collect(),
            n_reserved_blocks: self.n_reserved,
            n_used_blocks: self.pool.n_used(),
        }
    }
}
