//! Model-free simulation: drive the scheduler through a workload, every
//! request generating exactly `max_tokens` tokens, and record every step.
//!
//! One driver ([`drive`]) runs the published arrive-then-observe order for
//! every kind of output; a [`Recorder`] decides what is kept. Stretches of
//! idle steps (nothing queued or running until the next arrival) are run in
//! one go and recorded as one span, so a far-future arrival costs nothing.

use crate::config::SchedulerConfig;
use crate::error::{CoreError, InvalidRequest};
use crate::plan::StepPlan;
use crate::scheduler::{PlanDetail, Scheduler, UpdateOutcome};
use crate::trace::StepRecord;

/// One request of a simulated workload. Its id is its index in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimRequest {
    /// Step at which it is added (before that step is observed).
    pub arrival: u64,
    pub prompt_len: u32,
    pub max_tokens: u32,
}

/// A simulation's records (every step materialized) and the requests refused
/// at `add_request`.
#[derive(Clone, Debug, Default)]
pub struct SimResult {
    pub records: Vec<StepRecord>,
    pub rejected: Vec<(String, InvalidRequest)>,
}

/// One step of a [`CompactTrace`]: request indices instead of id strings, and
/// the waiting queue as a range of [`CompactTrace::accepted`] (the queue is
/// FIFO and nothing is aborted in a simulation, so it is always contiguous).
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
pub struct CompactTrace {
    /// Indices of accepted requests in the order they were queued.
    pub accepted: Vec<u32>,
    pub records: Vec<CompactRecord>,
    /// Rejected requests: index and reason.
    pub rejected: Vec<(u32, InvalidRequest)>,
}

impl CompactTrace {
    /// Steps covered: `0..n_steps()` (idle spans counted in full).
    pub fn n_steps(&self) -> u64 {
        self.records.last().map_or(0, |r| r.step + r.span)
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
        let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>();
        StepRecord {
            step: r.step,
            tkv: r.tkv,
            waiting: ids(self.waiting(i)),
            running: ids(&r.running),
            request_outputs: ids(&r.request_outputs),
            finished_requests: ids(&r.finished_requests),
            n_reserved_blocks: r.n_reserved_blocks,
            n_used_blocks: r.n_used_blocks,
        }
    }
}

/// Runs the workload. Observation order is the published one: requests that
/// arrive at step N are added, then step N is observed, then step N + 1 runs.
/// With `steps = None` it runs until every request has finished and the step
/// after (tkv back to 0); otherwise it records steps `0..=steps`.
pub fn simulate(cfg: SchedulerConfig, requests: &[SimRequest], steps: Option<u64>) -> SimResult {
    let t = simulate_compact(cfg, requests, steps, &mut || false).expect("never interrupted");
    SimResult {
        records: (0..t.n_steps()).filter_map(|s| t.record_at(s)).collect(),
        rejected: t.rejected.into_iter().map(|(i, e)| (i.to_string(), e)).collect(),
    }
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

/// Runs every request to `max_tokens` (token 0 each step): arrivals at step
/// N are added, then step N is observed, then step N + 1 runs. Stops after
/// `steps` or, with `None`, once everything finished and the pool is whole.
/// `interrupt` is called every few thousand steps (e.g. to check for
/// Ctrl-C); when it returns true the run stops with [`Interrupted`].
pub fn drive(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    steps: Option<u64>,
    rec: &mut impl Recorder,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<(), Interrupted> {
    let mut sched = Scheduler::new(cfg);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut next = 0;
    let mut tokens = Vec::new();
    let mut outcome = UpdateOutcome::default();
    let last = steps.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let mut turns = 0u64;
    loop {
        turns += 1;
        if turns % INTERRUPT_EVERY == 0 && interrupt() {
            return Err(Interrupted);
        }
        if n > 0 {
            // Nothing queued, running or to free: every step until the next
            // arrival is the same idle step. Run them at once, record one span.
            if sched.is_drained() && sched.tkv() == 0 {
                let until = match order.get(next) {
                    Some(&i) => requests[i].arrival.saturating_sub(1).min(last),
                    None => last,
                };
                if until > n && (steps.is_some() || next < order.len()) {
                    sched.skip_idle_steps(until - n + 1);
                    rec.observed(&sched, n, until - n + 1);
                    if until >= last {
                        return Ok(());
                    }
                    n = until + 1;
                    continue;
                }
            }
            let plan = sched.schedule_with(PlanDetail::Minimal).expect("no step is pending between simulation steps");
            rec.planned(&sched, &plan, n);
            tokens.clear();
            tokens.resize(plan.n_sequences(), 0);
            sched.update_into(&tokens, &[], &mut outcome).expect("one token per planned sequence");
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let r = requests[i];
            let result = match sched.add_request_tagged(&i.to_string(), i as u32, r.prompt_len, r.max_tokens) {
                Ok(()) => Ok(()),
                Err(CoreError::InvalidRequest(e)) => Err(e),
                Err(e) => unreachable!("add_request_tagged only fails validation: {e}"),
            };
            rec.added(i as u32, result);
            next += 1;
        }
        rec.observed(&sched, n, 1);
        match steps {
            Some(s) if n >= s => return Ok(()),
            None if next == order.len() && sched.is_drained() && sched.tkv() == 0 => return Ok(()),
            _ => {}
        }
        n += 1;
    }
}

/// [`simulate`], keeping the trace compact (see [`CompactTrace`]).
pub fn simulate_compact(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    steps: Option<u64>,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<CompactTrace, Interrupted> {
    struct Rec {
        trace: CompactTrace,
        admitted: u32,
    }
    impl Recorder for Rec {
        fn planned(&mut self, _: &Scheduler, plan: &StepPlan, _: u64) {
            if matches!(plan, StepPlan::Prefill(_)) {
                self.admitted += 1;
            }
        }
        fn added(&mut self, index: u32, result: Result<(), InvalidRequest>) {
            match result {
                Ok(()) => self.trace.accepted.push(index),
                Err(e) => self.trace.rejected.push((index, e)),
            }
        }
        fn observed(&mut self, sched: &Scheduler, n: u64, span: u64) {
            let t = &mut self.trace;
            debug_assert_eq!(t.accepted.len() - self.admitted as usize, sched.n_waiting());
            t.records.push(CompactRecord {
                step: n,
                span,
                tkv: sched.tkv(),
                waiting: (self.admitted, t.accepted.len() as u32),
                running: sched.running().map(|r| r.tag).collect(),
                request_outputs: sched.last_outputs().map(|r| r.tag).collect(),
                finished_requests: sched.last_finished().map(|r| r.tag).collect(),
                n_reserved_blocks: sched.n_reserved_blocks(),
                n_used_blocks: sched.n_used_blocks(),
            });
        }
    }
    let mut rec = Rec { trace: CompactTrace::default(), admitted: 0 };
    drive(cfg, requests, steps, &mut rec, interrupt)?;
    Ok(rec.trace)
}

/// Step kinds in [`SimStats::kind`].
pub const KIND_IDLE: u8 = 0;
pub const KIND_PREFILL: u8 = 1;
pub const KIND_DECODE: u8 = 2;

/// Compact per-step and per-request statistics of a simulation (no id lists),
/// for long workloads and capacity planning.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Per row: the first step it stands for (row 0 = step 0, before any step).
    pub step: Vec<u64>,
    /// Per row: how many consecutive identical steps it stands for (1, or
    /// more for a stretch of idle steps).
    pub span: Vec<u64>,
    /// Per row: batch tkv after the step.
    pub tkv: Vec<u32>,
    /// Per row: kind of the step (0 idle, 1 prefill, 2 decode; step 0 idle).
    pub kind: Vec<u8>,
    /// Per row: sequences in the batch after the step.
    pub n_running: Vec<u32>,
    pub n_waiting: Vec<u32>,
    pub n_reserved_blocks: Vec<u32>,
    pub n_used_blocks: Vec<u32>,
    /// Per row: KV slots the step computes over (prefill: its padded input;
    /// decode: batch size x (tkv + 1)) and how many of those are padding.
    pub computed_slots: Vec<u64>,
    pub padding_slots: Vec<u64>,
    /// Per request (list order): step it was prefilled / finished; `u64::MAX`
    /// for rejected requests.
    pub admitted: Vec<u64>,
    pub finished: Vec<u64>,
    pub rejected: Vec<(String, InvalidRequest)>,
    /// Steps in which the head of the waiting queue was kept out, by
    /// admission condition (indexed like [`crate::Rejection::ALL`]).
    pub waits: [u64; 6],
    /// When each request emitted its tokens.
    pub latency: crate::chunked_sim::LatencyTracker,
}

/// Like [`simulate`] but records [`SimStats`] instead of full step records.
/// With `record_steps = false` only the per-request columns are kept (memory
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
        record_steps: bool,
        /// (kind, computed, padding) of the step being run
        step: (u8, u64, u64),
    }
    impl Recorder for Rec {
        fn planned(&mut self, sched: &Scheduler, plan: &StepPlan, n: u64) {
            if let Some(why) = sched.last_rejection() {
                self.st.waits[why.index()] += 1;
            }
            self.step = match plan {
                StepPlan::Idle => (KIND_IDLE, 0, 0),
                StepPlan::Prefill(p) => {
                    let idx = sched.last_outputs().next().map(|r| r.tag).expect("the prefilled request");
                    self.st.admitted[idx as usize] = n;
                    self.st.latency.scheduled(idx as usize, n);
                    let computed = u64::from(p.input_len());
                    (KIND_PREFILL, computed, computed - u64::from(p.prompt_len))
                }
                StepPlan::Chunk(c) => {
                    (KIND_PREFILL, u64::from(c.chunk_size), u64::from(c.chunk_size - (c.end - c.start)))
                }
                StepPlan::Decode(d) => {
                    (KIND_DECODE, u64::from(d.batch_size) * (u64::from(d.tkv) + 1), sched.batch_padding())
                }
            };
        }
        fn added(&mut self, index: u32, result: Result<(), InvalidRequest>) {
            if let Err(e) = result {
                self.st.rejected.push((index.to_string(), e));
            }
        }
        fn observed(&mut self, sched: &Scheduler, n: u64, span: u64) {
            if span == 1 {
                for idx in sched.last_outputs().map(|r| r.tag) {
                    self.st.latency.token(idx as usize, n);
                }
            }
            for idx in sched.last_finished().map(|r| r.tag) {
                self.st.finished[idx as usize] = n;
                self.st.latency.finished(idx as usize, n);
            }
            let (kind, computed, padding) = std::mem::replace(&mut self.step, (KIND_IDLE, 0, 0));
            if self.record_steps {
                let st = &mut self.st;
                st.step.push(n);
                st.span.push(span);
                st.tkv.push(sched.tkv());
                st.kind.push(kind);
                st.n_running.push(sched.n_running() as u32);
                st.n_waiting.push(sched.n_waiting() as u32);
                st.n_reserved_blocks.push(sched.n_reserved_blocks());
                st.n_used_blocks.push(sched.n_used_blocks());
                st.computed_slots.push(computed);
                st.padding_slots.push(padding);
            }
        }
    }
    let st = SimStats {
        latency: crate::chunked_sim::LatencyTracker::new(requests.iter().map(|r| r.arrival)),
        admitted: vec![u64::MAX; requests.len()],
        finished: vec![u64::MAX; requests.len()],
        ..Default::default()
    };
    let mut rec = Rec { st, record_steps, step: (KIND_IDLE, 0, 0) };
    drive(cfg, requests, steps, &mut rec, interrupt)?;
    Ok(rec.st)
}
