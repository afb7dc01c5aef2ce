//! Property tests: the scheduler's promises hold on random workloads and
//! configurations, with random early stops and aborts.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use spyre_cb_core::{Scheduler, SchedulerConfig, StepPlan, BLOCK_SIZE};

/// (arrival, prompt_len, max_tokens, stop_after: Option<tokens>, abort_at: Option<step>)
type Req = (u64, u32, u32, Option<u32>, Option<u64>);

#[derive(Clone, Debug)]
struct Workload {
    max_num_seqs: u32,
    max_model_len: u32,
    n_blocks: u32,
    limit: Option<u64>,
    /// (arrival, prompt_len, max_tokens, stop_after: Option<tokens>, abort_at: Option<step>)
    requests: Vec<Req>,
}

fn workload() -> impl Strategy<Value = Workload> {
    (1u32..=16, 1u32..=64)
        .prop_flat_map(|(seqs, mml_blocks)| {
            let mml = mml_blocks * BLOCK_SIZE;
            let min_blocks = mml_blocks;
            let max_blocks = mml_blocks * seqs * 2;
            (
                Just(seqs),
                Just(mml),
                min_blocks..=max_blocks,
                prop_oneof![Just(None), (u64::from(mml) / 2..=u64::from(mml) * u64::from(seqs) * 2).prop_map(Some)],
                prop::collection::vec(request(mml), 0..40),
            )
        })
        .prop_map(|(max_num_seqs, max_model_len, n_blocks, limit, requests)| Workload {
            max_num_seqs,
            max_model_len,
            n_blocks,
            limit,
            requests,
        })
}

fn request(mml: u32) -> impl Strategy<Value = Req> {
    (0u64..120, 1u32..=mml, 0u32..=100, prop::option::weighted(0.15, 1u32..50), prop::option::weighted(0.1, 0u64..200))
        .prop_map(move |(arr, pl, frac, stop, abort)| {
            // mostly valid lengths, sometimes too long or max_tokens 0
            let room = mml.saturating_sub(pl);
            let mt = if frac == 0 {
                0
            } else if frac > 95 {
                room + 1
            } else {
                (room * frac / 95).max(1)
            };
            (arr, pl, mt, stop, abort)
        })
}

fn run(w: &Workload) -> Result<(), TestCaseError> {
    let cfg = SchedulerConfig::new(w.max_num_seqs, w.max_model_len, Some(w.n_blocks), w.limit).unwrap();
    let limit = cfg.max_batch_tkv_limit;
    let mml = w.max_model_len;
    let mut s = Scheduler::new(cfg);
    let mut accepted: Vec<usize> = Vec::new();
    let mut generated: HashMap<String, u32> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut aborted: HashSet<String> = HashSet::new();
    let mut admitted_order: Vec<usize> = Vec::new();
    let mut order: Vec<usize> = (0..w.requests.len()).collect();
    order.sort_by_key(|&i| w.requests[i].0);
    let mut next = 0;
    let total: u64 = w.requests.iter().map(|r| u64::from(r.2) + 2).sum::<u64>() + 200;
    let mut step = 0u64;
    loop {
        if step > 0 {
            let plan = s.schedule().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ids: Vec<String> = plan.request_ids().iter().map(|x| x.to_string()).collect();
            match &plan {
                StepPlan::Prefill(p) => {
                    let i: usize = p.request_id.parse().unwrap();
                    admitted_order.push(i);
                    prop_assert!(p.tkv <= mml, "prefill tkv {} > max_model_len", p.tkv);
                    prop_assert!(p.input_len() % BLOCK_SIZE == 0);
                    prop_assert!(p.positions.len() as u32 == p.input_len());
                }
                StepPlan::Decode(d) => {
                    prop_assert!(d.tkv < mml, "decode writes at {} >= max_model_len {mml}", d.tkv);
                    let volume = d.request_ids.len() as u64 * (u64::from(d.tkv) + 1);
                    prop_assert!(volume <= limit, "batch x tkv {volume} > limit {limit} at step {step}");
                    for (k, &slot) in d.slot_mapping.iter().enumerate() {
                        let row = d.block_table_row(k);
                        let b = (slot / i64::from(BLOCK_SIZE)) as u32;
                        prop_assert!(row.contains(&b), "slot outside the block table");
                        prop_assert!(d.left_padding[k] < d.current_tkv[k]);
                        prop_assert!(d.current_tkv[k] <= row.iter().filter(|&&x| x != 0).count() as u32 * BLOCK_SIZE);
                    }
                }
                StepPlan::Idle => {}
                StepPlan::Chunk(_) => unreachable!("the continuous policy never chunks"),
            }
            let stopped: Vec<bool> = ids
                .iter()
                .map(|id| {
                    let i: usize = id.parse().unwrap();
                    let g = generated.entry(id.clone()).or_default();
                    *g += 1;
                    w.requests[i].3.is_some_and(|n| *g >= n)
                })
                .collect();
            let tokens = vec![7u32; ids.len()];
            let out = s.update(&tokens, &stopped).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for id in out.finished {
                let id = id.to_string();
                let i: usize = id.parse().unwrap();
                let (_, _, mt, stop, _) = w.requests[i];
                let g = generated[&id];
                let want = stop.map_or(mt, |n| n.min(mt));
                prop_assert_eq!(g, want, "request {} generated {} tokens", i, g);
                finished.insert(id);
            }
            // aborts between steps
            for &i in &accepted {
                let id = i.to_string();
                if w.requests[i].4 == Some(step) && !finished.contains(&id) && !aborted.contains(&id) {
                    s.abort(&id).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    aborted.insert(id);
                }
            }
        }
        while next < order.len() && w.requests[order[next]].0 <= step {
            let i = order[next];
            let (_, pl, mt, _, _) = w.requests[i];
            let valid = pl >= 1 && mt >= 1 && pl + mt <= mml && {
                let aligned = pl.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                let start = if aligned + mt > mml { pl } else { aligned };
                u64::from(start + mt - 1) <= limit
            };
            let res = s.add_request_len(&i.to_string(), pl, mt);
            prop_assert_eq!(res.is_ok(), valid, "request {} ({}, {}) accepted={}", i, pl, mt, res.is_ok());
            if valid {
                accepted.push(i);
            }
            next += 1;
        }
        s.check_invariants().map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        if next == order.len() && s.is_drained() && s.tkv() == 0 {
            break;
        }
        step += 1;
        prop_assert!(step < total * 4, "no progress: deadlock or starvation");
    }
    // every accepted request finished or was aborted; FIFO admission
    for &i in &accepted {
        let id = i.to_string();
        prop_assert!(finished.contains(&id) || aborted.contains(&id), "request {} never finished", i);
    }
    let mut fifo: Vec<usize> = accepted.clone();
    fifo.sort_by_key(|&i| (w.requests[i].0, i));
    let admitted: Vec<usize> = fifo.iter().copied().filter(|i| admitted_order.contains(i)).collect();
    prop_assert_eq!(admitted, admitted_order, "admission is not FIFO");
    prop_assert_eq!(s.n_used_blocks(), 0);
    prop_assert_eq!(s.n_reserved_blocks(), 0);
    prop_assert_eq!(s.kv().n_free(), w.n_blocks);
    Ok(())
}

fn cases() -> u32 {
    std::env::var("SPYRE_CB_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn scheduler_invariants_hold(w in workload()) {
        run(&w)?;
    }
}
