//! Model-free simulation: drive the scheduler through a workload, every
//! request generating exactly `max_tokens` tokens, and record every step.

use crate::config::Config;
use crate::error::InvalidRequest;
use crate::scheduler::{PlanDetail, Scheduler};
use crate::trace::StepRecord;

/// One request of a simulated workload. Its id is its index in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimRequest {
    /// Step at which it is added (before that step is observed).
    pub arrival: u64,
    pub prompt_len: u32,
    pub max_tokens: u32,
}

/// A simulation's records and the requests refused at `add_request`.
#[derive(Clone, Debug, Default)]
pub struct SimResult {
    pub records: Vec<StepRecord>,
    pub rejected: Vec<(String, InvalidRequest)>,
}

/// Runs the workload. Observation order is the published one: requests that
/// arrive at step N are added, then step N is observed, then step N + 1 runs.
/// With `steps = None` it runs until every request has finished and the step
/// after (tkv back to 0); otherwise it records steps `0..=steps`.
pub fn simulate(cfg: Config, requests: &[SimRequest], steps: Option<u64>) -> SimResult {
    let mut sched = Scheduler::new(cfg);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut next = 0;
    let mut result = SimResult::default();
    let mut tokens = Vec::new();
    for n in 0u64.. {
        if n > 0 {
            let plan = sched
                .schedule_with(PlanDetail::IdsOnly)
                .expect("no step is pending between simulation steps");
            tokens.clear();
            tokens.resize(plan.n_sequences(), 0);
            sched.update(&tokens, &[]).expect("one token per planned sequence");
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let r = requests[i];
            let id = i.to_string();
            if let Err(e) = sched.validate(&id, r.prompt_len, r.max_tokens) {
                result.rejected.push((id, e));
            } else {
                sched.add_request_len(&id, r.prompt_len, r.max_tokens).expect("validated");
            }
            next += 1;
        }
        result.records.push(sched.snapshot());
        match steps {
            Some(s) if n >= s => break,
            None if next == order.len() && sched.is_drained() && sched.tkv() == 0 => break,
            _ => {}
        }
    }
    result
}

/// Step kinds in [`SimStats::kind`].
pub const KIND_IDLE: u8 = 0;
pub const KIND_PREFILL: u8 = 1;
pub const KIND_DECODE: u8 = 2;

/// Compact per-step and per-request statistics of a simulation (no id lists),
/// for long workloads and capacity planning.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Per step (index 0 = before any step): batch tkv after the step.
    pub tkv: Vec<u32>,
    /// Per step: kind of the step (0 idle, 1 prefill, 2 decode; step 0 idle).
    pub kind: Vec<u8>,
    /// Per step: sequences in the batch after the step.
    pub n_running: Vec<u32>,
    pub n_waiting: Vec<u32>,
    pub n_reserved_blocks: Vec<u32>,
    pub n_used_blocks: Vec<u32>,
    /// Per step: KV slots the step computes over (prefill: its padded input;
    /// decode: batch size x (tkv + 1)) and how many of those are padding.
    pub computed_slots: Vec<u64>,
    pub padding_slots: Vec<u64>,
    /// Per request (list order): step it was prefilled / finished; `u64::MAX`
    /// for rejected requests.
    pub admitted: Vec<u64>,
    pub finished: Vec<u64>,
    pub rejected: Vec<(String, InvalidRequest)>,
}

/// Like [`simulate`] but records [`SimStats`] instead of full step records.
/// With `record_steps = false` only the per-request columns are kept (memory
/// then does not grow with the number of steps).
pub fn simulate_stats(cfg: Config, requests: &[SimRequest], steps: Option<u64>, record_steps: bool) -> SimStats {
    use crate::plan::StepPlan;

    let mut sched = Scheduler::new(cfg);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut next = 0;
    let mut st = SimStats {
        admitted: vec![u64::MAX; requests.len()],
        finished: vec![u64::MAX; requests.len()],
        ..Default::default()
    };
    let mut tokens = Vec::new();
    for n in 0u64.. {
        let (mut kind, mut computed, mut padding) = (KIND_IDLE, 0u64, 0u64);
        if n > 0 {
            let plan = sched.schedule_with(PlanDetail::IdsOnly).expect("no pending step");
            match &plan {
                StepPlan::Idle => {}
                StepPlan::Prefill(p) => {
                    kind = KIND_PREFILL;
                    let idx: usize = p.request_id.parse().expect("index id");
                    st.admitted[idx] = n;
                    computed = u64::from(p.input_len());
                    padding = computed - u64::from(p.prompt_len);
                }
                StepPlan::Decode(d) => {
                    kind = KIND_DECODE;
                    computed = d.request_ids.len() as u64 * (u64::from(d.tkv) + 1);
                    padding = sched.batch_padding();
                }
            }
            tokens.clear();
            tokens.resize(plan.n_sequences(), 0);
            let out = sched.update(&tokens, &[]).expect("one token per planned sequence");
            for id in out.finished {
                let idx: usize = id.parse().expect("index id");
                st.finished[idx] = n;
            }
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let r = requests[i];
            let id = i.to_string();
            match sched.add_request_len(&id, r.prompt_len, r.max_tokens) {
                Ok(()) => {}
                Err(crate::error::CoreError::InvalidRequest(e)) => st.rejected.push((id, e)),
                Err(e) => unreachable!("add_request_len only fails validation: {e}"),
            }
            next += 1;
        }
        if record_steps {
            st.tkv.push(sched.tkv());
            st.kind.push(kind);
            st.n_running.push(sched.n_running() as u32);
            st.n_waiting.push(sched.n_waiting() as u32);
            st.n_reserved_blocks.push(sched.n_reserved_blocks());
            st.n_used_blocks.push(sched.n_used_blocks());
            st.computed_slots.push(computed);
            st.padding_slots.push(padding);
        }
        match steps {
            Some(s) if n >= s => break,
            None if next == order.len() && sched.is_drained() && sched.tkv() == 0 => break,
            _ => {}
        }
    }
    st
}
