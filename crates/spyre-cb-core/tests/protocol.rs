//! The schedule -> update protocol under failure: aborts while a step is in
//! flight, cancelling a step, and simulations with long idle stretches.

use spyre_cb_core::{
    simulate_trace, CoreError, InvalidRequest, Scheduler, SchedulerConfig, SimRequest, StateError, StepPlan,
};

fn sched() -> Scheduler {
    Scheduler::new(SchedulerConfig::new(2, 192, None, None).unwrap())
}

#[test]
fn abort_during_a_step_is_queued_and_applied_when_it_closes() {
    let mut s = sched();
    s.add_request("a", vec![1; 10], 5).unwrap();
    s.add_request("b", vec![2; 10], 5).unwrap();
    s.schedule().unwrap(); // prefill a
    s.abort("b").unwrap(); // b is waiting: queued, not lost
    s.abort("a").unwrap(); // a is in flight
    let out = s.update(&[7], &[]).unwrap();
    assert!(out.finished.is_empty());
    assert_eq!(out.aborted.iter().map(|x| &**x).collect::<Vec<_>>(), ["b", "a"]);
    assert!(!s.has_unfinished_requests());
    s.check_invariants().unwrap();
    assert!(matches!(s.schedule().unwrap(), StepPlan::Idle));
    s.update(&[], &[]).unwrap();
    assert_eq!((s.n_used_blocks(), s.n_reserved_blocks()), (0, 0));
}

#[test]
fn a_request_that_finishes_in_the_step_ends_finished_not_aborted() {
    let mut s = sched();
    s.add_request("a", vec![1; 10], 1).unwrap();
    s.schedule().unwrap();
    s.abort("a").unwrap();
    let out = s.update(&[7], &[]).unwrap();
    assert_eq!(out.finished.len(), 1);
    assert!(out.aborted.is_empty());
}

#[test]
fn cancel_aborts_the_step_and_leaves_the_rest_usable() {
    let mut s = sched();
    s.add_request("a", vec![1; 10], 50).unwrap();
    s.schedule().unwrap();
    s.update(&[3], &[]).unwrap();
    s.add_request("b", vec![2; 100], 5).unwrap();
    let reserved_before = s.n_reserved_blocks();
    let plan = s.schedule().unwrap(); // prefill b with a tkv shift
    assert!(matches!(plan, StepPlan::Prefill(ref p) if p.tkv_shift == 64));
    let out = s.cancel().unwrap();
    assert_eq!(out.aborted.iter().map(|x| &**x).collect::<Vec<_>>(), ["b"]);
    s.check_invariants().unwrap();
    assert!(matches!(s.schedule().unwrap(), StepPlan::Decode(ref d) if d.batch_size == 1));
    s.update(&[4], &[]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.n_reserved_blocks(), reserved_before, "b's blocks are back");
    assert!(matches!(s.cancel(), Err(CoreError::State(StateError::UpdateWithoutPlan))));
}

#[test]
fn reusing_an_id_of_a_request_finishing_this_step_says_so() {
    let mut s = sched();
    s.add_request("a", vec![1; 10], 1).unwrap();
    s.schedule().unwrap();
    s.update(&[3], &[]).unwrap();
    let e = s.add_request("a", vec![1; 10], 1).unwrap_err();
    assert!(matches!(e, CoreError::InvalidRequest(InvalidRequest::DuplicateId { finishing: true, .. })));
    assert!(e.to_string().contains("finished in the last step"), "{e}");
    s.schedule().unwrap();
    s.update(&[], &[]).unwrap();
    s.add_request("a", vec![1; 10], 1).unwrap();
}

#[test]
fn far_future_arrivals_are_one_idle_span() {
    let cfg = SchedulerConfig::new(2, 192, None, None).unwrap();
    let reqs = [SimRequest::new(0, 10, 3), SimRequest::new(1_000_000_000, 10, 5)];
    let t = simulate_trace(cfg.clone(), &reqs, None, &mut || false).unwrap();
    assert!(t.records.len() < 20, "{} records", t.records.len());
    let span = t.records.iter().find(|r| r.span > 1).expect("an idle span");
    assert_eq!(span.step + span.span, 1_000_000_000);
    let at = t.record_at(500_000_000).unwrap();
    assert_eq!((at.step, at.tkv), (500_000_000, 0));
    assert!(at.running.is_empty() && at.waiting.is_empty());
    let arrival = t.record_at(1_000_000_000).unwrap();
    assert_eq!(arrival.waiting, ["1"]);
    assert_eq!(t.n_steps(), 1_000_000_000 + 5 + 2);
    // huge `steps` with nothing to do is one span too
    let t = simulate_trace(cfg.clone(), &[], Some(u64::MAX >> 1), &mut || false).unwrap();
    assert!(t.records.len() <= 2);
    assert_eq!(t.n_steps(), (u64::MAX >> 1) + 1);
    // the interrupt hook stops a long run
    let long = vec![SimRequest::new(0, 10, 150); 2000];
    assert!(simulate_trace(cfg, &long, None, &mut || true).is_err());
}

#[test]
fn the_core_decides_how_requests_end() {
    use spyre_cb_core::{ChunkOptions, FinishReason, Policy, StopRule};
    let rule = StopRule { stop_token_ids: vec![7], eos_token_ids: vec![2], min_tokens: 2 };
    let cb = SchedulerConfig::new(4, 256, None, None).unwrap();
    let ch = SchedulerConfig::with_policy(4, 256, None, None, Policy::Chunked(ChunkOptions::default())).unwrap();
    // the same token stream through both policies: (tokens each step) -> how each request ends
    for chunked in [false, true] {
        let mut cb_s = Scheduler::new(cb.clone());
        let mut ch_s = Scheduler::new(ch.clone());
        let add = |id: &str, mt: u32, cb_s: &mut Scheduler, ch_s: &mut Scheduler| {
            if chunked {
                ch_s.add_request_with(id, vec![1; 10], mt, rule.clone()).unwrap();
            } else {
                cb_s.add_request_with(id, vec![1; 10], mt, rule.clone()).unwrap();
            }
        };
        add("eos_early", 10, &mut cb_s, &mut ch_s); // EOS as its first token: too early (min_tokens 2)
        let mut ends = std::collections::HashMap::new();
        let feed = |tok: u32,
                    cb_s: &mut Scheduler,
                    ch_s: &mut Scheduler,
                    ends: &mut std::collections::HashMap<String, (FinishReason, Option<u32>)>| {
            let n =
                if chunked { ch_s.schedule().unwrap().n_sequences() } else { cb_s.schedule().unwrap().n_sequences() };
            let toks = vec![tok; n];
            let out = if chunked { ch_s.update(&toks, &[]).unwrap() } else { cb_s.update(&toks, &[]).unwrap() };
            for i in 0..out.finished.len() {
                ends.insert(out.finished[i].to_string(), (out.finish_reasons[i], out.stop_tokens[i]));
            }
        };
        feed(2, &mut cb_s, &mut ch_s, &mut ends); // prefill: EOS, generated 1 < min_tokens
        assert!(ends.is_empty());
        feed(7, &mut cb_s, &mut ch_s, &mut ends); // a stop id at token 2
        assert_eq!(ends["eos_early"], (FinishReason::Stop, Some(7)), "chunked={chunked}");
        add("len", 2, &mut cb_s, &mut ch_s);
        feed(3, &mut cb_s, &mut ch_s, &mut ends);
        feed(2, &mut cb_s, &mut ch_s, &mut ends); // EOS at max_tokens: stop wins, no stop id
        assert_eq!(ends["len"], (FinishReason::Stop, None));
        add("len2", 2, &mut cb_s, &mut ch_s);
        feed(3, &mut cb_s, &mut ch_s, &mut ends);
        feed(3, &mut cb_s, &mut ch_s, &mut ends);
        assert_eq!(ends["len2"], (FinishReason::Length, None));
    }
}

/// An abort between steps acts at once and is reported by the next step
/// that closes, under both policies; until then the request counts as
/// unfinished (its final word is still to be given).
#[test]
fn an_abort_between_steps_is_reported_by_the_next_close() {
    use spyre_cb_core::{ChunkOptions, Policy};
    let chunked = Policy::Chunked(ChunkOptions::default());
    for policy in [Policy::Continuous, chunked] {
        let cfg = SchedulerConfig::with_policy(2, 256, None, None, policy).unwrap();
        let mut s = Scheduler::new(cfg);
        s.add_request("a", vec![1; 10], 5).unwrap();
        s.add_request("b", vec![2; 10], 5).unwrap();
        let plan = s.schedule().unwrap();
        s.update(&vec![3; plan.n_sequences()], &[]).unwrap();
        s.abort("b").unwrap(); // waiting
        s.abort("a").unwrap(); // running
        assert!(s.has_unfinished_requests(), "{policy:?}: not reported yet");
        assert!(matches!(s.schedule().unwrap(), StepPlan::Idle));
        let out = s.update(&[], &[]).unwrap();
        assert_eq!(out.aborted.iter().map(|x| &**x).collect::<Vec<_>>(), ["b", "a"], "{policy:?}");
        assert!(!s.has_unfinished_requests() && s.is_drained(), "{policy:?}");
        s.check_invariants().unwrap();
    }
}
