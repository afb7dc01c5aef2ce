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
    /// Step that emitted the first token (`None`: rejected or never).
    pub first_token: Option<u64>,
    pub finished: Option<u64>,
    /// Steps between consecutive tokens.
    pub gaps: Vec<u32>,
    /// Longest stretch of consecutive paused steps.
    pub max_pause: u32,
}

/// A chunked simulation: one record per observed step (idle stretches as one
/// record with `span > 1`).
#[derive(Clone, Debug, Default)]
pub struct ChunkedSimResult {
    pub records: Vec<(ChunkedRecord, u64)>,
    pub rejected: Vec<(usize, InvalidRequest)>,
    pub counters: Counters,
    pub times: Vec<RequestTimes>,
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
    let mut res = ChunkedSimResult {
        times: requests.iter().map(|r| RequestTimes { arrival: r.arrival, ..Default::default() }).collect(),
        ..Default::default()
    };
    let mut last_token_step: Vec<u64> = vec![0; requests.len()];
    let mut pause_run: Vec<u32> = vec![0; requests.len()];
    let mut next = 0usize;
    let mut tokens: Vec<u32> = Vec::new();
    let mut outcome = UpdateOutcome::default();
    let last = steps.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let mut turns = 0u64;
    let observe = |sched: &ChunkedScheduler, res: &mut ChunkedSimResult, n: u64, span: u64| {
        if keep_records {
            let mut rec = sched.snapshot();
            rec.base.step = n;
            res.records.push((rec, span));
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
                    observe(&sched, &mut res, n, until - n + 1);
                    if until >= last {
                        break;
                    }
                    n = until + 1;
                    continue;
                }
            }
            let plan = sched.schedule_with(PlanDetail::Minimal).expect("no step pending between simulation steps");
            if let StepPlan::Decode(_) = plan {
                res.max_decode_volume = res.max_decode_volume.max(sched.last_decode_volume());
            }
            tokens.clear();
            for r in sched.last_outputs() {
                let i = r.tag as usize;
                let g = sched.generated(r.id).unwrap_or(0) as usize;
                tokens.push(requests[i].outputs.get(g).copied().unwrap_or(NO_MATCH_TOKEN));
                let t = &mut res.times[i];
                if t.first_token.is_none() {
                    t.first_token = Some(n);
                } else {
                    t.gaps.push((n - last_token_step[i]) as u32);
                }
                last_token_step[i] = n;
            }
            for r in sched.paused() {
                let i = r.tag as usize;
                pause_run[i] += 1;
                res.times[i].max_pause = res.times[i].max_pause.max(pause_run[i]);
            }
            for r in sched.last_outputs() {
                pause_run[r.tag as usize] = 0;
            }
            sched.update_into(&tokens, &[], &mut outcome).expect("one token per sampling sequence");
            for r in sched.last_finished() {
                res.times[r.tag as usize].finished = Some(n);
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
        observe(&sched, &mut res, n, 1);
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
