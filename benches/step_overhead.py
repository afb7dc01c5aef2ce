"""Per-step overhead of the engine outside the model forward.

Times every Engine.step() and the model forward inside it on a decode-heavy
workload with the tiny model; reports the mean microseconds per step spent
outside the forward (scheduling, plan crossing, input tensors, sampling,
update), for decode and prefill steps separately.

    python benches/step_overhead.py [--max-num-seqs 32] [--requests 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import spyre_cb
from spyre_cb import SamplingParams
from spyre_cb.models import make_tiny_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_checkpoint(Path(tmp) / "m", seed=0, num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1)
        eng = spyre_cb.Engine(model, max_num_seqs=a.max_num_seqs, max_model_len=512, num_threads=a.threads)
        fwd = {"t": 0.0}
        inner = eng.runner._forward

        def timed(*args, **kw):
            t = time.perf_counter()
            out = inner(*args, **kw)
            fwd["t"] += time.perf_counter() - t
            return out

        eng.runner._forward = timed
        g = torch.Generator().manual_seed(0)
        for i in range(a.requests):
            pl = int(torch.randint(8, 200, (1,), generator=g))
            p = torch.randint(0, 500, (pl,), generator=g).tolist()
            eng.add_request(str(i), p, SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True))
        outside = {"prefill": [], "decode": []}
        while eng.has_unfinished_requests():
            fwd["t"] = 0.0
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            kind = eng.last_plan_kind
            if kind in outside:
                outside[kind].append(dt - fwd["t"])
        for kind, v in outside.items():
            v = v[5:]  # warm-up
            print(
                f"{kind:<8} steps {len(v):>6}  outside the forward: mean {1e6 * statistics.mean(v):8.1f} us, "
                f"median {1e6 * statistics.median(v):8.1f} us  (batch up to {a.max_num_seqs}, torch threads {a.threads})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
