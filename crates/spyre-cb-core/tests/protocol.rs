//! The schedule -> update protocol under failure: aborts while a step is in
//! flight, cancelling a step, and simulations with long idle stretches.

use spyre_cb_core::{
    simulate_compact, CoreError, InvalidRequest, Scheduler, SchedulerConfig, SimRequest, StateError, StepPlan,
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
    let reqs = [
        SimRequest { arrival: 0, prompt_len: 10, max_tokens: 3 },
        SimRequest { arrival: 1_000_000_000, prompt_len: 10, max_tokens: 5 },
    ];
    let t = simulate_compact(cfg.clone(), &reqs, None, &mut || false).unwrap();
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
    let t = simulate_compact(cfg.clone(), &[], Some(u64::MAX >> 1), &mut || false).unwrap();
    assert!(t.records.len() <= 2);
    assert_eq!(t.n_steps(), (u64::MAX >> 1) + 1);
    // the interrupt hook stops a long run
    let long = [SimRequest { arrival: 0, prompt_len: 10, max_tokens: 150 }; 2000];
    assert!(simulate_compact(cfg, &long, None, &mut || true).is_err());
}
