//! Model-free simulation of either policy: drive the scheduler through a
//! workload, every request generating exactly `max_tokens` tokens (its given
//! output ids, or ids that match no prompt), and record every step.
//!
//! One driver ([`drive`]) runs the published arrive-then-observe order for
//! every kind of output; a [`Recorder`] decides what is kept: a compact
//! [`Trace`] of every observation, or the columns of [`SimStats`]. Stretches
//! of idle steps (nothing queued or running until the next arrival) are run
//! in one go and recorded as one span, so a far-future arrival costs nothing.

use crate::config::SchedulerConfig;
use crate::error::{CoreError, InvalidRequest};
use crate::latency::LatencyTracker;
use crate::plan::StepPlan;
use crate::record::{ChunkedState, Counters, StepRecord};
use crate::scheduler::{PlanDetail, Scheduler, UpdateOutcome};

/// The token a simulated request generates when none are given: it matches
/// no prompt token (ids are < 2^31 in every tokenizer).
pub const NO_MATCH_TOKEN: u32 = u32::MAX;

/// One request of a simulated workload. Its id is `id` or its index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimRequest {
    pub id: Option<String>,
    /// Step at which it is added (before that step is observed).
    pub arrival: u64,
    /// Prompt length; `prompt` (when not empty) has this many ids.
    pub prompt_len: u32,
    /// Prompt token ids (empty: a token-less request, never a cache hit).
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    /// Tokens to emit, in order (missing ones are [`NO_MATCH_TOKEN`]).
    pub outputs: Vec<u32>,
}

impl SimRequest {
    /// A token-less request.
    pub fn new(arrival: u64, prompt_len: u32, max_tokens: u32) -> Self {
        Self { arrival, prompt_len, max_tokens, ..Self::default() }
    }
    /// Its id: the given one or its index.
    pub fn name(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| index.to_string())
    }
}

/// One step of a [`Trace`]: request indices instead of id strings, and the
/// waiting queue as a range of [`Trace::accepted`] (the queue is FIFO and
/// nothing is aborted in a simulation, so it is always contiguous).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactRecord {
    /// First step the record stands for.
    pub step: u64,
    /// Consecutive identical steps it stands for (1, or more for an idle span).
    pub span: u64,
    pub tkv: u32,
    pub waiting: (u32, u32),
    pub running: Vec<u32>,
    pub request_outputs: Vec<u32>,
    pub finished_requests: Vec<u32>,
    pub n_reserved_blocks: u32,
    pub n_used_blocks: u32,
}

/// A whole simulation, stored in O(steps x batch) rather than O(steps x queue).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Request ids by index.
    pub names: Vec<String>,
    /// Indices of accepted requests in the order they were queued.
    pub accepted: Vec<u32>,
    pub records: Vec<CompactRecord>,
    /// The chunked policy's block-level state per record (empty under the
    /// continuous policy).
    pub chunked: Vec<ChunkedState>,
    /// Rejected requests: index and reason.
    pub rejected: Vec<(u32, InvalidRequest)>,
    pub counters: Counters,
    pub latency: LatencyTracker,
    /// Largest batch x tkv of any decode step.
    pub max_decode_volume: u64,
}

impl Trace {
    /// Steps covered: `0..n_steps()` (idle spans counted in full).
    pub fn n_steps(&self) -> u64 {
        self.records.last().map_or(0, |r| r.step + r.span)
    }

    /// Every step's observation, materialized (idle spans expanded).
    pub fn steps(&self) -> Vec<StepRecord> {
        (0..self.n_steps()).filter_map(|s| self.record_at(s)).collect()
    }

    /// Index of the record that covers `step`, if the trace reaches it.
    pub fn record_index(&self, step: u64) -> Option<usize> {
        if step >= self.n_steps() {
            return None;
        }
        Some(self.records.partition_point(|r| r.step + r.span <= step))
    }

    /// The observation at `step` (ids as strings).
    pub fn record_at(&self, step: u64) -> Option<StepRecord> {
        let i = self.record_index(step)?;
        let mut r = self.record(i);
        r.step = step;
        Some(r)
    }

    /// Request indices waiting at record `i`, in queue order.
    pub fn waiting(&self, i: usize) -> &[u32] {
        let (a, b) = self.records[i].waiting;
        &self.accepted[a as usize..b as usize]
    }

    /// The full record `i`, with ids as strings.
    pub fn record(&self, i: usize) -> StepRecord {
        let r = &self.records[i];
        let ids = |v: &[u32]| v.iter().map(|&j| self.names[j as usize].clone()).collect::<Vec<_>>();
        StepRecord {
            step: r.step,
            tkv: r.tkv,
            waiting: ids(self.waiting(i)),
            running: ids(&r.running),
            request_outputs: ids(&r.request_outputs),
            finished_requests: ids(&r.finished_requests),
            n_reserved_blocks: r.n_reserved_blocks,
            n_used_blocks: r.n_used_blocks,
            chunked: self.chunked.get(i).cloned().map(Box::new),
        }
    }
}

/// Runs the workload and keeps every observation. Observation order is the
/// published one: requests that arrive at step N are added, then step N is
/// observed, then step N + 1 runs. With `steps = None` it runs until every
/// request has finished and the step after (tkv back to 0); otherwise it
/// records steps `0..=steps`.
pub fn simulate(cfg: SchedulerConfig, requests: &[SimRequest], steps: Option<u64>) -> Trace {
    simulate_trace(cfg, requests, steps, &mut || false).expect("never interrupted")
}

/// What a simulation records; [`drive`] calls these in the published order.
pub trait Recorder {
    /// Between `schedule` and `update` of step `n` (n >= 1).
    fn planned(&mut self, sched: &Scheduler, plan: &StepPlan, n: u64);
    /// After `add_request` of request `index` (at its arrival step).
    fn added(&mut self, index: u32, result: Result<(), InvalidRequest>);
    /// Steps `n..n + span` observed (after their updates and arrivals); all
    /// alike, so `span > 1` only for idle stretches.
    fn observed(&mut self, sched: &Scheduler, n: u64, span: u64);
}

/// The simulation stopped early because `interrupt` asked it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted;

/// How many loop turns between two calls of the `interrupt` hook.
const INTERRUPT_EVERY: u64 = 1 << 15;

/// Runs every request to `max_tokens`: arrivals at step N are added, then
/// step N is observed, then step N + 1 runs. Stops after `steps` or, with
/// `None`, once everything finished and the pool is whole. `interrupt` is
/// called every few thousand steps (e.g. to check for Ctrl-C); when it
/// returns true the run stops with [`Interrupted`]. Returns the scheduler
/// (its counters).
pub fn drive(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    steps: Option<u64>,
    rec: &mut impl Recorder,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<Scheduler, Interrupted> {
    let mut sched = Scheduler::new(cfg);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut next = 0;
    let mut tokens = Vec::new();
    let mut outcome = UpdateOutcome::default();
    let last = steps.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let mut turns = 0u64;
    let idle = |s: &Scheduler| s.is_drained() && s.tkv() == 0 && s.last_outputs().next().is_none();
    loop {
        turns += 1;
        if turns.is_multiple_of(INTERRUPT_EVERY) && interrupt() {
            return Err(Interrupted);
        }
        if n > 0 {
            // Nothing queued, running or holding blocks: every step until the
            // next arrival is the same idle step. Run them at once, record one span.
            if idle(&sched) {
                let until = match order.get(next) {
                    Some(&i) => requests[i].arrival.saturating_sub(1).min(last),
                    None => last,
                };
                if until > n && (steps.is_some() || next < order.len()) {
                    sched.skip_idle_steps(until - n + 1);
                    rec.observed(&sched, n, until - n + 1);
                    if until >= last {
                        return Ok(sched);
                    }
                    n = until + 1;
                    continue;
                }
            }
            let plan = sched.schedule_with(PlanDetail::Minimal).expect("no step is pending between simulation steps");
            rec.planned(&sched, &plan, n);
            tokens.clear();
            for r in sched.last_outputs() {
                let g = sched.generated(r.id).unwrap_or(0) as usize;
                tokens.push(requests[r.tag as usize].outputs.get(g).copied().unwrap_or(NO_MATCH_TOKEN));
            }
            sched.update_into(&tokens, &[], &[], &mut outcome).expect("one token per sampling sequence");
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let r = &requests[i];
            let id = r.name(i);
            let added = if r.prompt.is_empty() {
                sched.add_request_tagged(&id, i as u32, r.prompt_len, r.max_tokens)
            } else {
                sched.add_request_tokens_tagged(&id, i as u32, r.prompt.clone(), r.max_tokens)
            };
            let result = match added {
                Ok(()) => Ok(()),
                Err(CoreError::InvalidRequest(e)) => Err(e),
                Err(e) => unreachable!("adding a request only fails validation: {e}"),
            };
            rec.added(i as u32, result);
            next += 1;
        }
        rec.observed(&sched, n, 1);
        match steps {
            Some(s) if n >= s => return Ok(sched),
            None if next == order.len() && sched.is_drained() && sched.tkv() == 0 => return Ok(sched),
            _ => {}
        }
        n += 1;
    }
}

/// Latency and decode volume, kept by both recorders (and the fleet's).
pub(crate) struct Timing {
    pub latency: LatencyTracker,
    pub max_decode_volume: u64,
}

impl Timing {
    pub fn new(requests: &[SimRequest]) -> Self {
        Self { latency: LatencyTracker::new(requests.iter().map(|r| r.arrival)), max_decode_volume: 0 }
    }
    pub fn planned(&mut self, sched: &Scheduler, plan: &StepPlan, n: u64) {
        match plan {
            StepPlan::Prefill(_) | StepPlan::Chunk(_) => {
                let i = sched.running().next().expect("the prefilling request").tag;
                self.latency.scheduled(i as usize, n);
            }
            StepPlan::Decode(d) => {
                let volume = u64::from(d.batch_size) * (u64::from(d.tkv) + 1);
                self.max_decode_volume = self.max_decode_volume.max(volume);
            }
            StepPlan::Idle => {}
        }
        for r in sched.last_outputs() {
            self.latency.token(r.tag as usize, n);
        }
        for r in sched.paused() {
            self.latency.paused(r.tag as usize);
        }
    }
    pub fn observed(&mut self, sched: &Scheduler, n: u64) {
        for r in sched.last_finished() {
            self.latency.finished(r.tag as usize, n);
        }
    }
}

/// [`simulate`], interruptible.
pub fn simulate_trace(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    steps: Option<u64>,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<Trace, Interrupted> {
    struct Rec {
        trace: Trace,
        timing: Timing,
    }
    impl Recorder for Rec {
        fn planned(&mut self, sched: &Scheduler, plan: &StepPlan, n: u64) {
            self.timing.planned(sched, plan, n);
        }
        fn added(&mut self, index: u32, result: Result<(), InvalidRequest>) {
            match result {
                Ok(()) => self.trace.accepted.push(index),
                Err(e) => self.trace.rejected.push((index, e)),
            }
        }
        fn observed(&mut self, sched: &Scheduler, n: u64, span: u64) {
            self.timing.observed(sched, n);
            let t = &mut self.trace;
            let admitted = (t.accepted.len() - sched.n_waiting()) as u32;
            t.records.push(CompactRecord {
                step: n,
                span,
                tkv: sched.tkv(),
                waiting: (admitted, t.accepted.len() as u32),
                running: sched.running().map(|r| r.tag).collect(),
                request_outputs: sched.last_outputs().map(|r| r.tag).collect(),
                finished_requests: sched.last_finished().map(|r| r.tag).collect(),
                n_reserved_blocks: sched.n_reserved_blocks(),
                n_used_blocks: sched.n_used_blocks(),
            });
            if let Some(c) = sched.snapshot_chunked() {
                t.chunked.push(c);
            }
        }
    }
    let trace = Trace { names: requests.iter().enumerate().map(|(i, r)| r.name(i)).collect(), ..Default::default() };
    let mut rec = Rec { trace, timing: Timing::new(requests) };
    let sched = drive(cfg, requests, steps, &mut rec, interrupt)?;
    let mut trace = rec.trace;
    trace.counters = sched.counters();
    trace.latency = rec.timing.latency;
    trace.max_decode_volume = rec.timing.max_decode_volume;
    Ok(trace)
}

/// Step kinds in [`SimStats::kind`].
pub const KIND_IDLE: u8 = 0;
pub const KIND_PREFILL: u8 = 1;
pub const KIND_DECODE: u8 = 2;

/// Compact per-step and per-request statistics of a simulation (no id
/// lists), for long workloads and capacity planning.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Per row: the first step it stands for (row 0 = step 0, before any step).
    pub step: Vec<u64>,
    /// Per row: how many consecutive identical steps it stands for (1, or
    /// more for a stretch of idle steps).
    pub span: Vec<u64>,
    /// Per row: batch tkv after the step.
    pub tkv: Vec<u32>,
    /// Per row: kind of the step (0 idle, 1 prefill or chunk, 2 decode; step 0 idle).
    pub kind: Vec<u8>,
    /// Per row: sequences in the batch after the step, waiting, paused.
    pub n_running: Vec<u32>,
    pub n_waiting: Vec<u32>,
    pub n_paused: Vec<u32>,
    pub n_reserved_blocks: Vec<u32>,
    pub n_used_blocks: Vec<u32>,
    /// Per row: prompt blocks reused from the prefix cache by requests
    /// holding blocks (chunked policy; 0 otherwise).
    pub n_cached_blocks: Vec<u32>,
    /// Per row: KV slots the step computes over (prefill: its padded input;
    /// chunk: its chunk; decode: batch size x (tkv + 1)) and how many of
    /// those are padding.
    pub computed_slots: Vec<u64>,
    pub padding_slots: Vec<u64>,
    pub rejected: Vec<(u32, InvalidRequest)>,
    /// Steps in which the next prefill was held back, by reason (indexed
    /// like [`crate::Rejection::ALL`]).
    pub waits: [u64; crate::Rejection::ALL.len()],
    /// When each request was scheduled, emitted its tokens and finished.
    pub latency: LatencyTracker,
    pub counters: Counters,
    pub max_decode_volume: u64,
}

/// Like [`simulate`] but records [`SimStats`] instead of step records. With
/// `record_steps = false` only the per-request columns are kept (memory
/// then does not grow with the number of steps).
pub fn simulate_stats(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    steps: Option<u64>,
    record_steps: bool,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<SimStats, Interrupted> {
    struct Rec {
        st: SimStats,
        timing: Timing,
        record_steps: bool,
        /// (kind, computed, padding) of the step being run
        step: (u8, u64, u64),
    }
    impl Recorder for Rec {
        fn planned(&mut self, sched: &Scheduler, plan: &StepPlan, n: u64) {
            self.timing.planned(sched, plan, n);
            if let Some(why) = sched.last_rejection() {
                self.st.waits[why.index()] += 1;
            }
            self.step = match plan {
                StepPlan::Idle => (KIND_IDLE, 0, 0),
                StepPlan::Prefill(p) => {
                    let computed = u64::from(p.input_len());
                    (KIND_PREFILL, computed, computed - u64::from(p.prompt_len))
                }
                StepPlan::Chunk(c) => {
                    (KIND_PREFILL, u64::from(c.chunk_size), u64::from(c.chunk_size - (c.end - c.start)))
                }
                StepPlan::Decode(d) => {
                    (KIND_DECODE, u64::from(d.batch_size) * (u64::from(d.tkv) + 1), sched.decode_padding())
                }
            };
        }
        fn added(&mut self, index: u32, result: Result<(), InvalidRequest>) {
            if let Err(e) = result {
                self.st.rejected.push((index, e));
            }
        }
        fn observed(&mut self, sched: &Scheduler, n: u64, span: u64) {
            self.timing.observed(sched, n);
            let (kind, computed, padding) = std::mem::replace(&mut self.step, (KIND_IDLE, 0, 0));
            if self.record_steps {
                let st = &mut self.st;
                st.step.push(n);
                st.span.push(span);
                st.tkv.push(sched.tkv());
                st.kind.push(kind);
                st.n_running.push(sched.n_running() as u32);
                st.n_waiting.push(sched.n_waiting() as u32);
                st.n_paused.push(sched.n_paused() as u32);
                st.n_reserved_blocks.push(sched.n_reserved_blocks());
                st.n_used_blocks.push(sched.n_used_blocks());
                st.n_cached_blocks.push(sched.n_cached_blocks());
                st.computed_slots.push(computed);
                st.padding_slots.push(padding);
            }
        }
    }
    let mut rec = Rec { st: SimStats::default(), timing: Timing::new(requests), record_steps, step: (KIND_IDLE, 0, 0) };
    let sched = drive(cfg, requests, steps, &mut rec, interrupt)?;
    let mut st = rec.st;
    st.latency = rec.timing.latency;
    st.max_decode_volume = rec.timing.max_decode_volume;
    st.counters = sched.counters();
    Ok(st)
}
