//! Property tests of the chunked policy on random workloads (random limits,
//! chunk sizes, options, prompts sharing prefixes, early stops and aborts):
//! after every step the bookkeeping invariants hold (no block held without a
//! reference, ref counts equal holders, reservations within the free
//! blocks); no forward exceeds the batch x tkv limit with pausing on; every
//! accepted request completes and the pool comes back whole; paused requests
//! never starve (the longest pause is recorded and bounded).

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use spyre_cb_core::{ChunkOptions, Policy, Scheduler, SchedulerConfig, StepPlan, BLOCK_SIZE};

static WORST_PAUSE: AtomicU64 = AtomicU64::new(0);
static CASES: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);
static OVER_NO_PAUSE: AtomicU64 = AtomicU64::new(0);
static PAUSES: AtomicU64 = AtomicU64::new(0);

/// (arrival, prompt, max_tokens, stop after k tokens, abort at step)
type Req = (u64, Vec<u32>, u32, Option<u32>, Option<u64>);

#[derive(Clone, Debug)]
struct Work {
    seqs: u32,
    mml: u32,
    blocks: Option<u32>,
    limit: Option<u64>,
    opts: ChunkOptions,
    requests: Vec<Req>,
}

fn work() -> impl Strategy<Value = Work> {
    (
        1u32..6,
        prop_oneof![Just(130u32), Just(256), Just(300), Just(512)],
        prop::option::of(0u32..40),
        prop::option::of(0u64..3000),
        prop_oneof![Just(64u32), Just(128), Just(192)],
        any::<(bool, bool, bool)>(),
        // prompts: a shared stem (one of 3) and a random tail, from a tiny vocabulary
        prop::collection::vec(
            (
                0u64..40,
                0usize..3,
                0u32..=256,
                0u32..60,
                1u32..90,
                prop::option::of(0u32..40),
                prop::option::of(0u64..80),
            ),
            1..14,
        ),
    )
        .prop_map(|(seqs, mml, blocks, limit, chunk, (interleave, decode_pausing, prefix_caching), reqs)| {
            let stems: [Vec<u32>; 3] =
                [vec![1; 256], (0..256).map(|i| i % 7).collect(), (0..256).map(|i| i % 5 + 9).collect()];
            let requests = reqs
                .into_iter()
                .map(|(arr, stem, stem_len, tail, mt, stop, abort)| {
                    let mut p: Vec<u32> = stems[stem][..stem_len as usize].to_vec();
                    p.extend((0..tail).map(|i| 100 + (i * 31 + stem_len) % 11));
                    if p.is_empty() {
                        p.push(3);
                    }
                    (arr, p, mt, stop, abort)
                })
                .collect();
            Work {
                seqs,
                mml,
                blocks: blocks.map(|b| b + mml.div_ceil(BLOCK_SIZE)),
                limit: limit.map(|l| l + u64::from(mml)),
                opts: ChunkOptions { chunk_size: chunk, interleave, decode_pausing, prefix_caching },
                requests,
            }
        })
}

fn run(w: &Work) -> Result<(), TestCaseError> {
    let cfg = SchedulerConfig::with_policy(w.seqs, w.mml, w.blocks, w.limit, Policy::Chunked(w.opts)).unwrap();
    let limit = cfg.max_batch_tkv_limit;
    let n_blocks = cfg.available_blocks;
    let mut s = Scheduler::new(cfg);
    let mut accepted = vec![false; w.requests.len()];
    let mut ended = vec![false; w.requests.len()];
    let mut paused_for = vec![0u64; w.requests.len()];
    let budget: u64 = w.requests.iter().map(|r| u64::from(r.2) + r.1.len() as u64 / 64 + 4).sum::<u64>() * 4 + 200;
    let mut step = 0u64;
    loop {
        for (i, r) in w.requests.iter().enumerate() {
            if r.0 == step && s.add_request(&i.to_string(), r.1.clone(), r.2).is_ok() {
                accepted[i] = true;
            }
            if r.4 == Some(step) && accepted[i] && !ended[i] && s.abort(&i.to_string()).is_ok() {
                ended[i] = true;
            }
        }
        let arrivals_left = w.requests.iter().any(|r| r.0 > step);
        if !arrivals_left && !s.has_unfinished_requests() {
            break;
        }
        step += 1;
        prop_assert!(step <= budget, "no progress: {step} steps (budget {budget})");
        let plan = s.schedule().map_err(|e| TestCaseError::fail(e.to_string()))?;
        match &plan {
            StepPlan::Decode(d) => {
                let volume = u64::from(d.batch_size) * (u64::from(d.tkv) + 1);
                if w.opts.decode_pausing {
                    prop_assert!(volume <= limit, "batch x tkv {volume} > limit {limit}");
                } else if volume > limit {
                    OVER_NO_PAUSE.fetch_add(1, Ordering::Relaxed);
                }
                for k in 0..d.batch_size as usize {
                    let row = d.block_table_row(k);
                    let b = (d.slot_mapping[k] / i64::from(BLOCK_SIZE)) as u32;
                    prop_assert!(b != 0 && row.contains(&b), "decode slot outside its table");
                }
            }
            StepPlan::Chunk(c) => {
                prop_assert!(c.end > c.start && c.end <= c.prompt_len);
                prop_assert_eq!(c.slot_mapping.len() as u32, c.chunk_size);
                for &b in &c.block_slots {
                    prop_assert!(b == 0 || c.block_table.contains(&b));
                }
                prop_assert!(c.block_table.len() as u32 * BLOCK_SIZE >= c.end);
            }
            StepPlan::Idle => {}
            StepPlan::Prefill(_) => prop_assert!(false, "the chunked policy never prefills whole"),
        }
        for r in s.paused() {
            let i: usize = r.id.parse().unwrap();
            paused_for[i] += 1;
            WORST_PAUSE.fetch_max(paused_for[i], Ordering::Relaxed);
        }
        let ids: Vec<String> = plan.request_ids().iter().map(|x| x.to_string()).collect();
        for id in &ids {
            paused_for[id.parse::<usize>().unwrap()] = 0;
        }
        let tokens: Vec<u32> = ids.iter().map(|id| 100 + id.len() as u32).collect();
        let stopped: Vec<bool> = ids
            .iter()
            .map(|id| {
                let i: usize = id.parse().unwrap();
                w.requests[i].3.is_some_and(|k| s.generated(id).unwrap_or(0) + 1 >= k)
            })
            .collect();
        let out = s.update(&tokens, &stopped).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for id in out.finished.iter().chain(out.aborted.iter()) {
            ended[id.parse::<usize>().unwrap()] = true;
        }
        s.check_invariants().map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
    }
    for i in 0..w.requests.len() {
        prop_assert!(!accepted[i] || ended[i], "request {i} accepted but never completed");
    }
    prop_assert_eq!(s.n_used_blocks(), 0);
    prop_assert_eq!(s.n_reserved_blocks(), 0);
    prop_assert_eq!(s.kv().n_free(), n_blocks);
    CASES.fetch_add(1, Ordering::Relaxed);
    PAUSES.fetch_add(s.counters().pause_events, Ordering::Relaxed);
    STEPS.fetch_add(step, Ordering::Relaxed);
    Ok(())
}

#[test]
fn chunked_invariants_hold_on_random_workloads() {
    let cases = std::env::var("SPYRE_CB_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    if let Err(e) = runner.run(&work(), |w| run(&w)) {
        panic!("{e}");
    }
    let worst = WORST_PAUSE.load(Ordering::Relaxed);
    eprintln!(
        "chunked invariants: {} cases, {} steps, {} pause events, longest pause {worst} steps; \
         decode steps over the limit with pausing off: {}",
        CASES.load(Ordering::Relaxed),
        STEPS.load(Ordering::Relaxed),
        PAUSES.load(Ordering::Relaxed),
        OVER_NO_PAUSE.load(Ordering::Relaxed),
    );
    // a paused request is the first candidate of the next decode step, and
    // paused requests block every prefill: no pause outlasts the batch size
    assert!(worst <= 5, "a request stayed paused {worst} steps in a row");
}
