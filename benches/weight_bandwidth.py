"""Decode at real model sizes against this machine's memory bandwidth.

A decode step multiplies a few rows by every weight matrix, so at real sizes
it is bound by reading the weights once per step. This script measures how
close spyre_cb's decode gets to that limit:

1. **The machine's bandwidth**, STREAM-style with torch at the engine's
   thread count: ``read`` (``b.sum()``: what streaming weights needs),
   ``copy`` (``a[:] = b``, 2 arrays moved) and ``triad``
   (``a = b + s * c``, 3 arrays) over arrays far larger than the caches,
   best of 5, in GB/s (10^9 bytes).
2. **A random-weight checkpoint with a real architecture's shape** (``--shape``):
   ``granite-2b`` (hidden 2048, 40 layers, 16 heads, 8 KV heads, FFN 8192,
   vocabulary 49,152), ``granite-8b-8l`` (an 8B-class layer: hidden 4096, 32
   heads, 8 KV heads, FFN 12,800, vocabulary 49,152, with 8 of its 40 layers
   to fit this machine), or ``tiny``; saved in ``--dtype`` and loaded by
   spyre_cb (load time, peak RSS).
3. **Decode steps at batch B** (``--batch``, default 8 and 32): B requests of
   8-token prompts, prefilled, then ``--steps`` decode steps timed one by
   one (median). Weight bytes read per step: every linear layer's weight
   and the output head (the embedding table is read B rows at a time, not
   counted); achieved GB/s = those bytes / step time; the fraction of the
   triad bandwidth is the figure of merit (the issue's target: >= 70 % at
   batch 8). Tokens/s of the decode = B / step time. The host's bandwidth
   drifts over minutes on a shared machine, so a short triad (256 MiB
   arrays) is also run right before and right after each batch's steps;
   ``fraction_of_adjacent_triad`` divides by their mean (the same moment's
   baseline), ``fraction_of_triad`` by the full STREAM run at the end.

JSON on the last line.

    python benches/weight_bandwidth.py --shape granite-2b --dtype bfloat16 [--threads 1] [--linear-ops native onednn]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "granite-2b": dict(
        num_layers=40, hidden_size=2048, num_heads=16, num_kv_heads=8, intermediate_size=8192, model_vocab_size=49152
    ),
    "granite-8b-8l": dict(
        num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=12800, model_vocab_size=49152
    ),
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, model_vocab_size=0),
}


def stream(threads: int, n_bytes: int = 1 << 30) -> dict[str, float]:
    """Best-of-5 read (a sum), copy and triad bandwidth (GB/s) over float32 arrays of ``n_bytes`` each."""
    torch.set_num_threads(threads)
    n = n_bytes // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = {"read": 0.0, "copy": 0.0, "triad": 0.0}
    for _ in range(5):
        t = time.perf_counter()
        b.sum()
        best["read"] = max(best["read"], n_bytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        a.copy_(b)
        best["copy"] = max(best["copy"], 2 * n_bytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best["triad"] = max(best["triad"], 3 * n_bytes / (time.perf_counter() - t) / 1e9)
    del a, b, c
    return {k: round(v, 2) for k, v in best.items()}


#: bytes per array of the short STREAM run beside each batch's steps (far past the caches;
#: at most --stream-mib)
ADJACENT_STREAM_BYTES = 256 << 20


def weight_bytes(model: torch.nn.Module, element_size: int) -> int:
    """Bytes a decode step reads: every linear layer's weight (plain, native or prepacked
    for oneDNN), the output head among them; not the embedding table (B rows a step)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "out_features") and hasattr(m, "in_features"):
            total += int(m.in_features) * int(m.out_features) * element_size
    return total


def decode(engine: Any, batch: int, steps: int, vocab: int) -> dict[str, float]:
    from spyre_cb import SamplingParams

    p = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [(7 * i + k) % (vocab - 3) + 3 for k in range(8)], p)
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if engine.last_plan_kind == "decode" and engine.n_running == batch:
            times.append(dt)
    return {"step_s": statistics.median(times[1:]), "steps": len(times)}


def run_engine(path: Path, a: argparse.Namespace, ops: str, most: int) -> dict[str, Any]:
    """Loads one engine with ``linear_ops=ops`` and times its decode at each batch."""
    import gc

    from spyre_cb.engine import Engine

    t = time.perf_counter()
    eng = Engine(
        str(path),
        dtype=a.dtype,
        num_threads=a.threads,
        max_num_seqs=most,
        max_model_len=256,
        available_blocks=2 * most + 2,
        linear_ops=ops,
    )
    out: dict[str, Any] = {"linear_ops": eng.runner.linear_ops, "load_s": round(time.perf_counter() - t, 2)}
    # ru_maxrss is the process's peak so far: the first engine's is its own
    out["peak_rss_gb_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    wb = weight_bytes(eng.runner.model, 2 if a.dtype == "bfloat16" else 4)
    out["weight_gb_per_step"] = round(wb / 1e9, 3)
    out["batches"] = {}
    for b in a.batch:
        # the host's bandwidth drifts over minutes: a short triad right before and
        # right after the steps is the baseline of the same moment
        n_bytes = min(ADJACENT_STREAM_BYTES, a.stream_mib << 20)
        before = stream(a.threads, n_bytes)["triad"]
        d = decode(eng, b, a.steps, eng.vocab_size)
        after = stream(a.threads, n_bytes)["triad"]
        torch.set_num_threads(a.threads)
        gbs = wb / d["step_s"] / 1e9
        out["batches"][str(b)] = {
            "decode_step_s": round(d["step_s"], 4),
            "decode_tokens_per_s": round(b / d["step_s"], 1),
            "weight_gb_s": round(gbs, 2),
            "adjacent_triad_gb_s": [before, after],
            "fraction_of_adjacent_triad": round(gbs / ((before + after) / 2), 3),
        }
    eng.shutdown()
    del eng
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="granite-2b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--stream-mib", type=int, default=1024, help="bytes per STREAM array")
    ap.add_argument(
        "--linear-ops",
        nargs="+",
        default=["auto"],
        help="one engine per value, loaded in turn from the same checkpoint (e.g. native onednn)",
    )
    ap.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="write the checkpoint here and keep it, or reuse it if DIR holds one (then this process's peak "
        "memory is the engine's alone)",
    )
    a = ap.parse_args(argv)
    from spyre_cb.models import make_tiny_checkpoint

    shape = SHAPES[a.shape]
    result: dict[str, Any] = {"shape": a.shape, "dtype": a.dtype, "threads": a.threads}
    with tempfile.TemporaryDirectory(dir=os.environ.get("SPYRE_CB_BENCH_DIR")) as tmp:
        path = Path(a.checkpoint) if a.checkpoint else Path(tmp) / "m"
        if (path / "config.json").exists():
            result["write_checkpoint_s"] = None
        else:
            t = time.perf_counter()
            make_tiny_checkpoint(path, init_gain=1.0, dtype=a.dtype, **shape)
            result["write_checkpoint_s"] = round(time.perf_counter() - t, 1)
            print(f"checkpoint written in {result['write_checkpoint_s']} s", flush=True)
        most = max(a.batch)
        result["engines"] = {}
        for ops in a.linear_ops:
            result["engines"][ops] = run_engine(path, a, ops, most)
            print(f"linear_ops {ops}: {result['engines'][ops]}", flush=True)
    # after the engines, so that the peak memory reported is theirs, not the arrays'
    bw = stream(a.threads, a.stream_mib << 20)
    print(f"STREAM ({a.threads} thread(s)): read {bw['read']}, copy {bw['copy']}, triad {bw['triad']} GB/s", flush=True)
    result["stream_gb_s"] = bw
    for engine in result["engines"].values():
        for batch in engine["batches"].values():
            batch["fraction_of_triad"] = round(batch["weight_gb_s"] / bw["triad"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
