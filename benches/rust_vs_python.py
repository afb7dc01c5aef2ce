"""Rust core vs the pure-Python specification model of the same policy.

Runs one seeded workload through ``spyre_cb.simulate`` (Rust, PyO3 crossing
and Python record objects included) and through ``tests/spec_model.py``,
checks the two traces are identical step for step, and prints steps/s of
each and the ratio (median of several runs).

    python benches/rust_vs_python.py [--requests 5000] [--max-num-seqs 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import spec_model  # noqa: E402
import spyre_cb  # noqa: E402
from spyre_cb.workload import synthetic_workload  # noqa: E402


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--interarrival",
        type=float,
        action="append",
        help="mean steps between arrivals (repeatable; default 3 = saturated batch, 8 = light load)",
    )
    a = ap.parse_args(argv)
    ok = True
    for ia in a.interarrival or [3.0, 8.0]:
        ok &= run(a, ia)
    return 0 if ok else 1


def run(a, interarrival: float) -> bool:
    reqs = synthetic_workload(
        a.requests,
        seed=a.seed,
        max_model_len=a.max_model_len,
        mean_interarrival=interarrival,
        prompt_median=150,
        tokens_median=60,
    )
    limits = dict(max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)

    t_rust, trace = timed(lambda: spyre_cb.simulate(reqs, **limits), a.repeat)
    t_py, (want, rejected) = timed(lambda: spec_model.simulate(reqs, **limits), max(1, a.repeat // 2))
    identical = [r.to_dict() for r in trace] == want and sorted(trace.rejected) == sorted(rejected)
    steps = len(trace) - 1
    t_core, stats = timed(lambda: spyre_cb.simulate_stats(reqs, **limits), a.repeat)
    mean_batch = stats.summary()["mean_batch_size"]
    print(
        f"workload: {a.requests} requests arriving every {interarrival:g} steps on average, max_num_seqs "
        f"{a.max_num_seqs}, max_model_len {a.max_model_len}: {steps} steps, mean batch {mean_batch:.1f}"
    )
    print(f"identical traces: {'yes' if identical else 'NO'}")
    print(f"python spec model : {steps / t_py:>12,.0f} steps/s  ({t_py:.3f} s)")
    print(f"rust (simulate)   : {steps / t_rust:>12,.0f} steps/s  ({t_rust:.3f} s)  -> {t_py / t_rust:,.0f}x")
    print(f"rust (stats only) : {steps / t_core:>12,.0f} steps/s  ({t_core:.3f} s)  -> {t_py / t_core:,.0f}x")
    print()
    return identical


if __name__ == "__main__":
    sys.exit(main())
