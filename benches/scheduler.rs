//! Scheduler benchmarks (criterion). Run from the repository root: `cargo bench`.
//!
//! - `step_loop/*`: one schedule + update step (full plans, as the engine
//!   uses them) in steady state with 10,000 queued requests of mixed lengths.
//! - `step_vs_queue/*`: the same step with 100 and with 100,000 waiting: the
//!   cost must not grow with the queue.
//! - `can_schedule/*`: admission alone against a batch of max_num_seqs - 1.
//! - `block_pool/*`: allocate + free of one block (no prefix caching: the LIFO path).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spyre_cb_core::admission::{can_schedule, BatchView};
use spyre_cb_core::scheduler::PlanDetail;
use spyre_cb_core::workload::{Lengths, Synthetic, XorShift};
use spyre_cb_core::{BlockPool, Scheduler, SchedulerConfig};

/// A scheduler with `queue` requests waiting, kept topped up by `step`.
struct Loop {
    s: Scheduler,
    workload: Synthetic,
    queue: usize,
    next_id: u64,
    tokens: Vec<u32>,
    detail: PlanDetail,
}

impl Loop {
    fn new(seqs: u32, mml: u32, queue: usize, detail: PlanDetail) -> Self {
        let mut l = Loop {
            s: Scheduler::new(SchedulerConfig::new(seqs, mml, None, None).unwrap()),
            workload: Synthetic::new(
                42,
                mml,
                0.0,
                Lengths::Uniform { lo: 1, hi: mml / 2 },
                Lengths::Uniform { lo: 1, hi: 1024 },
            )
            .unwrap(),
            queue,
            next_id: 0,
            tokens: Vec::new(),
            detail,
        };
        l.refill();
        // warm up to a steady state (batch filled)
        for _ in 0..(4 * seqs as usize + 200) {
            l.step();
        }
        l
    }

    fn refill(&mut self) {
        while self.s.n_waiting() < self.queue {
            let r = self.workload.next().expect("endless");
            self.s.add_request_len(&self.next_id.to_string(), r.prompt_len, r.max_tokens).unwrap();
            self.next_id += 1;
        }
    }

    fn step(&mut self) -> usize {
        let plan = self.s.schedule_with(self.detail).unwrap();
        let n = plan.n_sequences();
        black_box(&plan);
        self.tokens.clear();
        self.tokens.resize(n, 1);
        let out = self.s.update(&self.tokens, &[]).unwrap();
        if !out.finished.is_empty() {
            self.refill();
        }
        n
    }
}

fn step_loop(c: &mut Criterion) {
    let mut g = c.benchmark_group("step_loop");
    g.throughput(Throughput::Elements(1));
    for (seqs, mml) in [(4u32, 2048u32), (32, 8192), (256, 32768)] {
        let mut l = Loop::new(seqs, mml, 10_000, PlanDetail::Full);
        g.bench_function(BenchmarkId::new("full_plan", format!("seqs{seqs}_mml{mml}")), |b| b.iter(|| l.step()));
        let mut l = Loop::new(seqs, mml, 10_000, PlanDetail::IdsOnly);
        g.bench_function(BenchmarkId::new("ids_only", format!("seqs{seqs}_mml{mml}")), |b| b.iter(|| l.step()));
    }
    g.finish();
}

fn step_vs_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("step_vs_queue");
    g.throughput(Throughput::Elements(1));
    for queue in [100usize, 100_000] {
        let mut l = Loop::new(32, 8192, queue, PlanDetail::Full);
        g.bench_function(BenchmarkId::new("seqs32_waiting", queue), |b| b.iter(|| l.step()));
    }
    g.finish();
}

fn admission(c: &mut Criterion) {
    let mut g = c.benchmark_group("can_schedule");
    for seqs in [4u32, 32, 256] {
        let cfg = SchedulerConfig::new(seqs, 32768, None, None).unwrap();
        let mut rng = XorShift::new(7);
        let remaining: Vec<u32> = (0..seqs - 1).map(|_| rng.range(1, 8000)).collect();
        let view = BatchView {
            tkv: 9000,
            running_remaining: &remaining,
            n_unreserved_blocks: cfg.available_blocks / 2,
            admitted_this_step: 0,
        };
        g.bench_function(BenchmarkId::new("admit_into_batch_of", seqs - 1), |b| {
            b.iter(|| can_schedule(black_box(&cfg), black_box(&view), black_box(9100), black_box(4000)))
        });
    }
    g.finish();
}

fn block_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_pool");
    g.throughput(Throughput::Elements(1));
    let mut pool = BlockPool::new(131_072);
    // a half-used pool with a scattered free list
    let mut held: Vec<u32> = (0..65_536).map(|_| pool.allocate().unwrap()).collect();
    for i in (0..held.len()).step_by(2) {
        pool.free(held[i]);
    }
    held.retain(|&b| pool.ref_count(b) > 0);
    g.bench_function("allocate_free", |b| {
        b.iter(|| {
            let x = pool.allocate().unwrap();
            pool.free(black_box(x))
        })
    });
    g.finish();
}

criterion_group!(benches, step_loop, step_vs_queue, admission, block_pool);
criterion_main!(benches);
