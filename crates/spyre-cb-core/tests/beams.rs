//! Beam search in the core: a request of `width` beams is prefilled once,
//! forks into `width` sequences that share the prompt's blocks, and each
//! `update_beams` hands every beam its parent's blocks (shared), copying
//! the block two beams would both write next. Step traces of forking and
//! sharing, the admission count, aborts and finishes returning every block.

use spyre_cb_core::{ChunkOptions, InvalidRequest, Policy, Scheduler, SchedulerConfig, StepPlan, StopRule};

fn sched(seqs: u32, mml: u32, blocks: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig::new(seqs, mml, Some(blocks), None).unwrap())
}

fn decode(plan: StepPlan) -> spyre_cb_core::DecodePlan {
    match plan {
        StepPlan::Decode(d) => d,
        other => panic!("expected a decode, got {other:?}"),
    }
}

#[test]
fn beams_share_the_prompt_and_fork_with_copy_on_write() {
    let mut s = sched(4, 256, 16);
    s.add_request_beams("b", vec![7; 70], 10, 3, StopRule::default()).unwrap();
    let StepPlan::Prefill(p) = s.schedule().unwrap() else { panic!("prefill first") };
    assert_eq!((p.tkv, p.block_table.len()), (128, 2));
    assert!(p.block_copies.is_empty());
    let prompt = p.block_table.clone();
    // the first token of each beam: every beam continues the prompt
    s.update_beams(&[11, 12, 13], &[], &[]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.n_running(), 3);
    assert_eq!(s.n_used_blocks(), 2, "three beams, one prompt");
    assert!(prompt.iter().all(|&b| s.kv().ref_count(b) == 3));
    assert_eq!(s.n_reserved_blocks(), 3 * 3, "each beam reserves one sequence's worst case");

    // tkv 128 is a block boundary: every beam starts its own block
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.request_ids.iter().map(|x| &**x).collect::<Vec<_>>(), ["b", "b", "b"]);
    assert_eq!(d.input_ids, [11, 12, 13]);
    assert!(d.block_copies.is_empty());
    let own: Vec<u32> = (0..3).map(|i| d.block_table_row(i)[2]).collect();
    assert_eq!(s.n_used_blocks(), 5);
    // beams 0 and 1 continue beam 0, beam 2 continues beam 1
    s.update_beams(&[21, 22, 23], &[], &[0, 0, 1]).unwrap();
    s.check_invariants().unwrap();
    // beam 0 keeps its block 2; beam 1 writes its copy; beam 2 took beam 1's; beam 2's went back
    assert_eq!(s.n_used_blocks(), 5);
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.block_copies.len(), 1);
    let (src, dst) = d.block_copies[0];
    assert_eq!(src, own[0]);
    assert_eq!(d.block_table_row(0)[2], own[0]);
    assert_eq!(d.block_table_row(1)[2], dst);
    assert_eq!(d.block_table_row(2)[2], own[1]);
    assert!((0..3).all(|i| d.block_table_row(i)[..2] == prompt[..]));
    assert_eq!(d.input_ids, [21, 22, 23]);
    assert_eq!(d.positions, [71, 71, 71]);
    s.update_beams(&[31, 32, 33], &[], &[2, 2, 2]).unwrap();
    s.check_invariants().unwrap();
    // every beam now continues beam 2: one history, its block copied twice
    assert_eq!(s.n_used_blocks(), 5);
    // abort: every fork's blocks return
    s.abort("b").unwrap();
    s.schedule().unwrap();
    s.update(&[], &[]).unwrap();
    assert!(s.is_drained(), "{} blocks still used", s.n_used_blocks());
}

#[test]
fn a_partial_last_prompt_block_is_copied_for_every_other_beam() {
    // 128 + 100 > 192: the batch starts at tkv 70, inside the prompt's second block
    let mut s = sched(4, 192, 16);
    s.add_request_beams("b", vec![3; 70], 100, 3, StopRule::default()).unwrap();
    let StepPlan::Prefill(p) = s.schedule().unwrap() else { panic!() };
    assert_eq!(p.tkv, 70);
    s.update_beams(&[1, 2, 3], &[], &[]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.n_used_blocks(), 4, "the shared first block, the second and two copies of it");
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.block_copies.len(), 2);
    assert!(d.block_copies.iter().all(|&(src, _)| src == p.block_table[1]));
    assert_eq!(d.block_table_row(0), &p.block_table[..]);
    // finishing at max_tokens: the request once, every beam's blocks back at the next step
    let mut finished = Vec::new();
    let mut tokens = vec![5, 6, 7];
    loop {
        let out = s.update_beams(&tokens, &[], &[0, 1, 2]).unwrap();
        s.check_invariants().unwrap();
        finished.extend(out.finished.iter().map(|x| x.to_string()));
        if !finished.is_empty() {
            break;
        }
        decode(s.schedule().unwrap());
        tokens = vec![5, 6, 7];
    }
    assert_eq!(finished, ["b"]);
    assert_eq!(s.generated("b"), Some(100));
    s.schedule().unwrap();
    assert!(s.is_drained());
}

#[test]
fn beams_count_in_admission_and_validation() {
    let mut s = sched(4, 256, 15);
    assert_eq!(s.validate_beams("x", 10, 5, 5).unwrap_err(), InvalidRequest::BeamWidth { width: 5, max_num_seqs: 4 });
    // alone at tkv 200, a beam needs 4 blocks: 4 beams need 16 of the 15
    assert_eq!(
        s.validate_beams("x", 200, 50, 4).unwrap_err(),
        InvalidRequest::TooManyBlocks { needed: 16, available_blocks: 15 }
    );
    assert!(s.validate_beams("x", 200, 50, 3).is_ok());
    s.add_request("a", vec![1; 10], 20).unwrap();
    s.add_request_beams("b", vec![2; 10], 20, 4, StopRule::default()).unwrap();
    assert!(matches!(s.schedule().unwrap(), StepPlan::Prefill(_)));
    s.update(&[1], &[]).unwrap();
    // one running + 4 beams > 4 sequences: "b" waits
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.batch_size, 1);
    assert_eq!(format!("{:?}", s.last_rejection()), "Some(BatchFull)");
    s.update(&[1], &[]).unwrap();
}

fn chunked(seqs: u32, mml: u32, blocks: u32, opts: ChunkOptions) -> Scheduler {
    Scheduler::new(SchedulerConfig::with_policy(seqs, mml, Some(blocks), None, Policy::Chunked(opts)).unwrap())
}

#[test]
fn chunked_beams_fork_after_the_last_chunk_and_reserve_for_every_beam() {
    let opts = ChunkOptions { chunk_size: 64, ..Default::default() };
    let mut s = chunked(4, 256, 20, opts);
    // 100 tokens: two chunks; the second block is partial, so each other beam gets a copy
    s.add_request_beams("b", (0..100).collect(), 30, 3, StopRule::default()).unwrap();
    let StepPlan::Chunk(c) = s.schedule().unwrap() else { panic!("a chunk") };
    assert!(!c.is_last);
    // it reserves for all three beams: 3 x ceil(130 / 64) = 9, less the block it holds
    assert_eq!(s.n_reserved_blocks(), 9 - 1);
    s.update(&[], &[]).unwrap();
    let StepPlan::Chunk(c) = s.schedule().unwrap() else { panic!("the last chunk") };
    assert!(c.is_last);
    assert_eq!(s.last_outputs().count(), 3, "the last chunk samples a token per beam");
    s.update_beams(&[1, 2, 3], &[], &[]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.n_running(), 3);
    assert_eq!(s.n_used_blocks(), 4, "one shared block, the partial one and its two copies");
    assert_eq!(s.n_reserved_blocks(), 9 - 4);
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.batch_size, 3);
    assert_eq!(d.block_copies.len(), 2);
    assert_eq!(d.positions, [100, 100, 100]);
    assert_eq!(d.input_ids, [1, 2, 3]);
    s.update_beams(&[4, 5, 6], &[], &[2, 2, 0]).unwrap();
    s.check_invariants().unwrap();
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.input_ids, [4, 5, 6]);
    assert_eq!(d.block_copies.len(), 1, "beams 0 and 1 both continue beam 2");
    s.update_beams(&[7, 8, 9], &[], &[0, 1, 2]).unwrap();
    s.check_invariants().unwrap();
    s.abort("b").unwrap();
    assert_eq!((s.n_used_blocks(), s.n_reserved_blocks()), (0, 0), "the chunked policy frees at once");
    s.schedule().unwrap();
    s.update(&[], &[]).unwrap();
    assert!(s.is_drained());
}

#[test]
fn chunked_beams_pause_and_resume_together() {
    // a tight volume: the beam search and a long request cannot all decode at once
    let opts = ChunkOptions { chunk_size: 64, ..Default::default() };
    let cfg = SchedulerConfig::with_policy(4, 256, Some(32), Some(3 * 70), Policy::Chunked(opts)).unwrap();
    let mut s = Scheduler::new(cfg);
    s.add_request("a", vec![9; 60], 100).unwrap();
    s.add_request_beams("b", vec![8; 60], 20, 2, StopRule::default()).unwrap();
    let mut paused_seen = false;
    for _ in 0..200 {
        if !s.has_unfinished_requests() {
            break;
        }
        s.schedule().unwrap();
        let ids: Vec<String> = s.last_outputs().map(|r| r.id.to_string()).collect();
        let beams = ids.iter().filter(|x| *x == "b").count();
        assert!(beams == 0 || beams == 2, "both beams sample, or neither: {ids:?}");
        let paused: Vec<String> = s.paused().map(|r| r.id.to_string()).collect();
        let pb = paused.iter().filter(|x| *x == "b").count();
        assert!(pb == 0 || pb == 2, "beams pause together: {paused:?}");
        paused_seen |= !paused.is_empty();
        let tokens = vec![1; ids.len()];
        let parents: Vec<u32> = (0..ids.len() as u32).collect();
        s.update_beams(&tokens, &[], &parents).unwrap();
        s.check_invariants().unwrap();
    }
    assert!(paused_seen, "the volume limit paused someone");
    s.schedule().unwrap();
    assert!(s.is_drained());
}

#[test]
fn parents_must_stay_within_their_request() {
    let mut s = sched(4, 256, 16);
    s.add_request("a", vec![1; 10], 20).unwrap();
    s.schedule().unwrap();
    s.update(&[1], &[]).unwrap();
    s.add_request_beams("b", vec![2; 10], 20, 2, StopRule::default()).unwrap();
    s.schedule().unwrap();
    s.update_beams(&[4, 5], &[], &[]).unwrap();
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.request_ids.iter().map(|x| &**x).collect::<Vec<_>>(), ["b", "b", "a"]);
    let err = s.update_beams(&[1, 2, 3], &[], &[0, 2, 2]).unwrap_err();
    assert!(err.to_string().contains("another request"), "{err}");
    let err = s.update_beams(&[1, 2, 3], &[], &[0, 1]).unwrap_err();
    assert!(err.to_string().contains("2 parents for 3 sequences"), "{err}");
    // nothing changed: the step closes with valid parents
    s.update_beams(&[1, 2, 3], &[], &[1, 1, 2]).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn a_cancelled_step_gives_back_the_copies_it_carried() {
    // the copy rides on another request's prefill, which fails: the beams still get it
    let mut s = sched(4, 192, 16);
    s.add_request_beams("b", vec![3; 70], 100, 2, StopRule::default()).unwrap();
    s.schedule().unwrap();
    s.update_beams(&[1, 2], &[], &[]).unwrap(); // tkv 70: the second block is partial, beam 1 copies it
    s.add_request("x", vec![4; 10], 5).unwrap();
    let StepPlan::Prefill(p) = s.schedule().unwrap() else { panic!("x's prefill") };
    assert_eq!(p.block_copies.len(), 1);
    let out = s.cancel().unwrap();
    assert_eq!(out.aborted.iter().map(|x| &**x).collect::<Vec<_>>(), ["x"]);
    let d = decode(s.schedule().unwrap());
    assert_eq!(d.block_copies, p.block_copies, "made before the beams' first decode");
    s.update_beams(&[5, 6], &[], &[0, 1]).unwrap();
    s.check_invariants().unwrap();
}
