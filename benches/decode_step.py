"""Decode step time: the native in-place kernel vs the vectorized torch ops.

The e2e Granite (4 layers, hidden 768, 12 heads / 6 KV heads, float32), a
full batch of 8 whose contexts spread over ``[ctx / 2, ctx]`` (so left
paddings differ, as in a real batch), 1024 KV blocks. For each context and
each op set, the median over timed decode steps of the whole step and of
the attention op alone (all layers), and the op's share of the step.

    python benches/decode_step.py [--contexts 128 512 1024 1792] [--steps 30] [--threads N] [--quick]
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
from spyre_cb import SamplingParams, attention
from spyre_cb.cpus import intra_op_threads
from spyre_cb.models import make_tiny_checkpoint


def measure(model: Path, ops: str, ctx: int, steps: int, threads: int) -> tuple[float, float]:
    eng = spyre_cb.Engine(
        model, max_num_seqs=8, max_model_len=2048, available_blocks=1024, attention_ops=ops, num_threads=threads
    )
    g = torch.Generator().manual_seed(ctx)
    params = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(8):
        n = ctx // 2 + (ctx // 2) * i // 7 - 8
        eng.add_request(str(i), torch.randint(0, 500, (max(1, n),), generator=g).tolist(), params)
    for _ in range(8 + 8):  # the prefills and the first decodes
        eng.step()
    op_time = 0.0
    inner = {"native": attention._native_decode, "vectorized": attention._decode}[ops]

    def timed(*a, **kw):
        nonlocal op_time
        t = time.perf_counter()
        out = inner(*a, **kw)
        op_time += time.perf_counter() - t
        return out

    import fms.modules.attention as fms_attention

    ops_map = getattr(fms_attention, "__type_factory_map")  # FMS's registry of attention ops

    name = attention.ATTENTION_OPS[ops]
    saved = ops_map[name]["compute_decode"]
    ops_map[name]["compute_decode"] = timed
    step_t, op_t = [], []
    try:
        for _ in range(steps):
            op_time = 0.0
            t = time.perf_counter()
            eng.step()
            assert eng.last_plan_kind == "decode"
            step_t.append(time.perf_counter() - t)
            op_t.append(op_time)
    finally:
        ops_map[name]["compute_decode"] = saved
        eng.shutdown()
    return statistics.median(step_t), statistics.median(op_t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 1792])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: the available CPUs)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--quick", action="store_true", help="smoke run: a small model, one context, 3 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.layers, args.hidden = [128], 3, 2, 256
    threads = intra_op_threads(args.threads or None)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_checkpoint(
            Path(tmp) / "bench",
            seed=0,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.hidden // 64,
            num_kv_heads=max(1, args.hidden // 128),
            vocab_size=512,
        )
        print(f"batch 8, Granite {args.layers} layers hidden {args.hidden}, 1024 KV blocks, torch threads {threads}")
        print("| context (tkv) | native step | native op | vectorized step | vectorized op | step ratio |")
        print("|---|---|---|---|---|---|")
        for ctx in args.contexts:
            ns, no = measure(model, "native", ctx, args.steps, threads)
            vs, vo = measure(model, "vectorized", ctx, args.steps, threads)
            print(
                f"| {ctx} | {1e3 * ns:.2f} ms | {1e3 * no:.2f} ms ({100 * no / ns:.0f} %) | {1e3 * vs:.2f} ms | "
                f"{1e3 * vo:.2f} ms ({100 * vo / vs:.0f} %) | {vs / ns:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
