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
