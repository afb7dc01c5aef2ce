//! Long run: a million requests through the scheduler, streamed (never all in
//! memory), reporting throughput per slice and peak RSS, to show constant
//! memory and no slowdown over time.
//!
//! `cargo run --release -p spyre-cb-core --example long_run -- [N_REQUESTS] [MAX_NUM_SEQS]`

use std::time::Instant;

use spyre_cb_core::scheduler::PlanDetail;
use spyre_cb_core::workload::{Lengths, Synthetic};
use spyre_cb_core::{Scheduler, SchedulerConfig};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seqs: u32 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(32);
    let mml = 4096;
    let mut s = Scheduler::new(SchedulerConfig::new(seqs, mml, None, None).unwrap());
    let mut workload =
        Synthetic::new(0x9e37, mml, 0.0, Lengths::Uniform { lo: 1, hi: 2048 }, Lengths::Uniform { lo: 1, hi: 512 })
            .expect("valid parameters");
    let slice = (n / 10).max(1);
    let (mut added, mut finished, mut steps, mut tokens) = (0u64, 0u64, 0u64, 0u64);
    let mut tok = Vec::new();
    let t0 = Instant::now();
    let mut t_slice = Instant::now();
    let mut slice_steps = 0u64;
    println!("{n} requests, max_num_seqs {seqs}, max_model_len {mml}");
    println!("{:>10} {:>12} {:>14} {:>12} {:>10}", "finished", "steps", "steps/s", "waiting", "RSS MiB");
    while finished < n {
        // keep a bounded queue in front of the batch (a steady stream of arrivals)
        while added < n && s.n_waiting() < 4 * seqs as usize {
            let r = workload.next().expect("endless");
            s.add_request_len(&added.to_string(), r.prompt_len, r.max_tokens).expect("valid by construction");
            added += 1;
        }
        let plan = s.schedule_with(PlanDetail::IdsOnly).unwrap();
        tok.clear();
        tok.resize(plan.n_sequences(), 0);
        let out = s.update(&tok, &[]).unwrap();
        tokens += tok.len() as u64;
        let before = finished;
        finished += out.finished.len() as u64;
        steps += 1;
        slice_steps += 1;
        if finished / slice != before / slice || finished == n {
            let dt = t_slice.elapsed().as_secs_f64();
            println!(
                "{finished:>10} {steps:>12} {:>14.0} {:>12} {:>10.1}",
                slice_steps as f64 / dt,
                s.n_waiting(),
                rss_kib("VmRSS:") as f64 / 1024.0
            );
            t_slice = Instant::now();
            slice_steps = 0;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "done: {steps} steps, {tokens} tokens in {dt:.1} s ({:.0} steps/s); peak RSS {:.1} MiB",
        steps as f64 / dt,
        rss_kib("VmHWM:") as f64 / 1024.0
    );
}
