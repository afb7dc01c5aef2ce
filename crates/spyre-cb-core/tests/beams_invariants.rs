//! Property test of beam search under both policies: random workloads mixing
//! beam searches (2-4 beams) and ordinary requests, random forks (each beam
//! continues a random beam of its request), early ends, aborts, failed
//! (cancelled) steps and prefix hits on blocks filled by decoding. After
//! every step the bookkeeping invariants hold (ref counts equal holders,
//! reservations add up and cover what may still be allocated); every request
//! ends exactly once; the pool comes back whole.

use std::collections::HashMap;

use proptest::prelude::*;
use spyre_cb_core::{ChunkOptions, Policy, Scheduler, SchedulerConfig, StopRule};

/// (arrival, prompt length, max_tokens, beams, end early after k tokens, abort at step)
type Req = (u64, u32, u32, u32, Option<u32>, Option<u64>);

fn work() -> impl Strategy<Value = (bool, u32, Option<u64>, ChunkOptions, Vec<Req>, u64)> {
    (
        any::<bool>(),
        4u32..9,
        prop::option::of(0u64..2000),
        (prop_oneof![Just(64u32), Just(128)], any::<(bool, bool, bool)>()),
        prop::collection::vec(
            (0u64..30, 1u32..150, 1u32..60, 1u32..5, prop::option::of(1u32..30), prop::option::of(0u64..60)),
            1..10,
        ),
        any::<u64>(),
    )
        .prop_map(|(chunked, seqs, limit, (chunk, (i, p, c)), reqs, seed)| {
            let opts = ChunkOptions { chunk_size: chunk, interleave: i, decode_pausing: p, prefix_caching: c };
            (chunked, seqs, limit, opts, reqs, seed)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn beams_keep_the_books((chunked, seqs, limit, opts, reqs, seed) in work()) {
        let mml = 256;
        let policy = if chunked { Policy::Chunked(opts) } else { Policy::Continuous };
        let limit = limit.map(|l| l + 4 * u64::from(mml));
        let mut s = Scheduler::new(SchedulerConfig::with_policy(seqs, mml, Some(40), limit, policy).unwrap());
        let mut rng = seed | 1;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut accepted: HashMap<String, (Option<u32>, Option<u64>)> = HashMap::new();
        let mut ended: HashMap<String, u32> = HashMap::new();
        for step in 0..3000u64 {
            for (i, &(arr, pl, mt, w, early, abort)) in reqs.iter().enumerate() {
                if arr == step {
                    let id = format!("r{i}");
                    // some prompts are all 7s, the token every sequence generates: prefix hits
                    // on blocks filled by decoding
                    let prompt: Vec<u32> = (0..pl).map(|t| if i % 3 == 0 { 7 } else { t % 13 }).collect();
                    let ok = if w > 1 {
                        s.add_request_beams(&id, prompt, mt, w, StopRule::default()).is_ok()
                    } else {
                        s.add_request(&id, prompt, mt).is_ok()
                    };
                    if ok {
                        accepted.insert(id, (early, abort));
                    }
                }
            }
            for (id, &(_, abort)) in &accepted {
                if abort == Some(step) && !ended.contains_key(id) && s.abort(id).is_ok() {
                    *ended.entry(id.clone()).or_default() += 0;
                }
            }
            if step > 40 && !s.has_unfinished_requests() {
                break;
            }
            s.schedule().unwrap();
            let ids: Vec<String> = s.last_outputs().map(|r| r.id.to_string()).collect();
            // each sequence continues a random sequence of its request (they are contiguous)
            let mut parents = Vec::with_capacity(ids.len());
            let mut stopped = Vec::with_capacity(ids.len());
            let mut i = 0;
            while i < ids.len() {
                let j = (i..ids.len()).find(|&j| ids[j] != ids[i]).unwrap_or(ids.len());
                let gen = s.generated(&ids[i]).unwrap_or(0);
                let stop = accepted.get(&ids[i]).and_then(|x| x.0).is_some_and(|k| gen + 1 >= k);
                for _ in i..j {
                    parents.push((i + next(j - i)) as u32);
                    stopped.push(stop);
                }
                i = j;
            }
            let tokens = vec![7; ids.len()];
            // now and then the step fails: its requests are aborted, the others go on
            let out = if next(12) == 0 { s.cancel().unwrap() } else { s.update_beams(&tokens, &stopped, &parents).unwrap() };
            for id in out.finished.iter().chain(out.aborted.iter()) {
                *ended.entry(id.to_string()).or_default() += 1;
            }
            if let Err(e) = s.check_invariants() {
                return Err(TestCaseError::fail(format!("step {step}: {e}")));
            }
        }
        prop_assert!(!s.has_unfinished_requests(), "requests left: {} running", s.n_running());
        for id in accepted.keys() {
            prop_assert_eq!(ended.get(id).copied(), Some(1), "{} ends once", id);
        }
        s.schedule().unwrap();
        s.update(&[], &[]).unwrap();
        prop_assert!(s.is_drained(), "{} blocks used, {} reserved", s.n_used_blocks(), s.n_reserved_blocks());
    }
}
