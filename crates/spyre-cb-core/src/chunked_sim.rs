//! Model-free simulation of the chunked policy: the published
//! arrive-then-observe order, every request generating exactly `max_tokens`
//! tokens (the given output token ids, or ids that match no prompt).

use crate::chunked::{ChunkedRecord, ChunkedScheduler, Counters};
use crate::config::SchedulerConfig;
use crate::error::{CoreError, InvalidRequest};
use crate::plan::StepPlan;
use crate::scheduler::{PlanDetail, UpdateOutcome};

/// The token a simulated request generates when none are given: it matches
/// no prompt token (ids are < 2^31 in every tokenizer).
pub const NO_MATCH_TOKEN: u32 = u32::MAX;

/// One request of a chunked simulation. Its id is `id` or its index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedSimRequest {
    pub id: Option<String>,
    pub arrival: u64,
    /// Prompt length; `prompt` (when not empty) must have this many ids.
    pub prompt_len: u32,
    /// Prompt token ids (empty: a token-less request, never a cache hit).
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    /// Tokens to emit, in order (missing ones are [`NO_MATCH_TOKEN`]).
    pub outputs: Vec<u32>,
}

/// Per-request timing of a simulation, in steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestTimes {
    pub arrival: u64,
    /// Step of its first prefill chunk (continuous policy: its prefill).
    pub scheduled: Option<u64>,
    /// Step that emitted the first token (`None`: rejected or never).
    pub first_token: Option<u64>,
    pub finished: Option<u64>,
    /// Steps between consecutive tokens.
    pub gaps: Vec<u32>,
    /// Longest stretch of consecutive paused steps.
    pub max_pause: u32,
}

/// Tracks when each request of a simulation emitted its tokens.
#[derive(Clone, Debug, Default)]
pub struct LatencyTracker {
    pub times: Vec<RequestTimes>,
    last: Vec<u64>,
    pause_run: Vec<u32>,
}

impl LatencyTracker {
    pub fn new(arrivals: impl Iterator<Item = u64>) -> Self {
        let times: Vec<RequestTimes> = arrivals.map(|arrival| RequestTimes { arrival, ..Default::default() }).collect();
        let n = times.len();
        Self { times, last: vec![0; n], pause_run: vec![0; n] }
    }
    /// Request `i` emitted a token in step `n`.
    pub fn token(&mut self, i: usize, n: u64) {
        let t = &mut self.times[i];
        if t.first_token.is_none() {
            t.first_token = Some(n);
        } else {
            t.gaps.push((n - self.last[i]) as u32);
        }
        self.last[i] = n;
        self.pause_run[i] = 0;
    }
    /// Request `i` ran its first prefill (chunk) in step `n` (later calls are ignored).
    pub fn scheduled(&mut self, i: usize, n: u64) {
        self.times[i].scheduled.get_or_insert(n);
    }
    /// Request `i` was paused in step `n`.
    pub fn paused(&mut self, i: usize) {
        self.pause_run[i] += 1;
        self.times[i].max_pause = self.times[i].max_pause.max(self.pause_run[i]);
    }
    pub fn finished(&mut self, i: usize, n: u64) {
        self.times[i].finished = Some(n);
    }
    /// Time to first token, inter-token latency and pause summaries (steps).
    pub fn summary(&self) -> LatencySummary {
        let mut ttft: Vec<u64> =
            self.times.iter().filter_map(|t| t.first_token.map(|f| f.saturating_sub(t.arrival))).collect();
        let mut itl: Vec<u64> = self.times.iter().flat_map(|t| t.gaps.iter().map(|&g| u64::from(g))).collect();
        LatencySummary {
            ttft: Summary::of(&mut ttft),
            itl: Summary::of(&mut itl),
            max_pause: self.times.iter().map(|t| t.max_pause).max().unwrap_or(0),
        }
    }
}

/// Mean, median and 99th percentile of a sample (0 for an empty one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &mut [u64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        // nearest-rank percentiles
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
        Self {
            n: v.len() as u64,
            mean: v.iter().sum::<u64>() as f64 / v.len() as f64,
            p50: rank(0.5),
            p99: rank(0.99),
            max: *v.last().unwrap() as f64,
        }
    }
}

/// What users compare policies by, in steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub ttft: Summary,
    pub itl: Summary,
    pub max_pause: u32,
}

/// A chunked simulation: one record per observed step (idle stretches as one
/// record with `span > 1`).
#[derive(Clone, Debug, Default)]
pub struct ChunkedSimResult {
    pub records: Vec<(ChunkedRecord, u64)>,
    pub rejected: Vec<(usize, InvalidRequest)>,
    pub counters: Counters,
    pub latency: LatencyTracker,
    /// Per record: kind of the step that led to it (0 idle, 1 prefill chunk,
    /// 2 decode), the KV slots it computed over and how many were padding.
    pub kinds: Vec<u8>,
    pub computed_slots: Vec<u64>,
    pub padding_slots: Vec<u64>,
    /// Steps in which the next prefill chunk was held back, by reason
    /// (indexed like [`crate::ChunkRejection::ALL`]).
    pub waits: [u64; 5],
    /// Largest batch x tkv of any decode step.
    pub max_decode_volume: u64,
    /// Steps covered.
    pub n_steps: u64,
}

impl ChunkedSimResult {
    /// The observation at `step`.
    pub fn record_at(&self, step: u64) -> Option<ChunkedRecord> {
        if step >= self.n_steps {
            return None;
        }
        let i = self.records.partition_point(|(r, span)| r.base.step + span <= step);
        let mut r = self.records[i].0.clone();
        r.base.step = step;
        Some(r)
    }
}

/// Runs the workload under `cfg` (which must name the chunked policy).
/// With `steps = None` it runs until everything finished and one step more.
/// `keep_records = false` keeps only counters and times.
pub fn simulate_chunked(
    cfg: SchedulerConfig,
    requests: &[ChunkedSimRequest],
    steps: Option<u64>,
    keep_records: bool,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<ChunkedSimResult, crate::simulate::Interrupted> {
    let mut sched = ChunkedScheduler::new(cfg);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut res =
        ChunkedSimResult { latency: LatencyTracker::new(requests.iter().map(|r| r.arrival)), ..Default::default() };
    let mut kind = 0u8;
    let mut next = 0usize;
    let mut tokens: Vec<u32> = Vec::new();
    let mut outcome = UpdateOutcome::default();
    let last = steps.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let mut turns = 0u64;
    let mut slots = (0u64, 0u64);
    let observe =
        |sched: &ChunkedScheduler, res: &mut ChunkedSimResult, n: u64, span: u64, kind: u8, slots: (u64, u64)| {
            if keep_records {
                let mut rec = sched.snapshot();
                rec.base.step = n;
                res.records.push((rec, span));
                res.kinds.push(kind);
                res.computed_slots.push(slots.0);
                res.padding_slots.push(slots.1);
            }
            res.n_steps = n + span;
        };
    loop {
        turns += 1;
        if turns % (1 << 15) == 0 && interrupt() {
            return Err(crate::simulate::Interrupted);
        }
        if n > 0 {
            if sched.is_drained() && sched.tkv() == 0 && sched.last_outputs().next().is_none() {
                let until = match order.get(next) {
                    Some(&i) => requests[i].arrival.saturating_sub(1).min(last),
                    None => last,
                };
                if until > n && (steps.is_some() || next < order.len()) {
                    sched.skip_idle_steps(until - n + 1);
                    observe(&sched, &mut res, n, until - n + 1, 0, (0, 0));
                    if until >= last {
                        break;
                    }
                    n = until + 1;
                    continue;
                }
            }
            let plan = sched.schedule_with(PlanDetail::Minimal).expect("no step pending between simulation steps");
            if let Some(why) = sched.last_rejection() {
                res.waits[why.index()] += 1;
            }
            (kind, slots) = match &plan {
                StepPlan::Decode(_) => {
                    res.max_decode_volume = res.max_decode_volume.max(sched.last_decode_volume());
                    (2, (sched.last_decode_volume(), sched.last_decode_padding()))
                }
                StepPlan::Chunk(c) => {
                    let i = sched.running().next().expect("the prefilling request").tag as usize;
                    res.latency.scheduled(i, n);
                    (1, (u64::from(c.chunk_size), u64::from(c.chunk_size - (c.end - c.start))))
                }
                _ => (0, (0, 0)),
            };
            tokens.clear();
            for r in sched.last_outputs() {
                let i = r.tag as usize;
                let g = sched.generated(r.id).unwrap_or(0) as usize;
                tokens.push(requests[i].outputs.get(g).copied().unwrap_or(NO_MATCH_TOKEN));
                res.latency.token(i, n);
            }
            for r in sched.paused() {
                res.latency.paused(r.tag as usize);
            }
            sched.update_into(&tokens, &[], &mut outcome).expect("one token per sampling sequence");
            for r in sched.last_finished() {
                res.latency.finished(r.tag as usize, n);
            }
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let r = &requests[i];
            let id = r.id.clone().unwrap_or_else(|| i.to_string());
            let added = if r.prompt.is_empty() {
                sched.add_request_tagged(&id, i as u32, r.prompt_len, r.max_tokens)
            } else {
                sched.add_request_tokens_tagged(&id, i as u32, r.prompt.clone(), r.max_tokens)
            };
            match added {
                Ok(()) => {}
                Err(CoreError::InvalidRequest(e)) => res.rejected.push((i, e)),
                Err(e) => unreachable!("adding a request only fails validation: {e}"),
            }
            next += 1;
        }
        observe(&sched, &mut res, n, 1, kind, slots);
        kind = 0;
        slots = (0, 0);
        match steps {
            Some(s) if n >= s => break,
            None if next == order.len() && sched.is_drained() && sched.tkv() == 0 => break,
            _ => {}
        }
        n += 1;
    }
    res.counters = sched.counters();
    Ok(res)
}
