"""Data-parallel replicas against one engine and tensor parallelism, on this machine's cores.

Builds one random-weight decoder checkpoint (4-layer hidden-768 Granite; the
tiny one with ``--quick``) and runs the same workload — ``--requests``
greedy requests, prompts 16-400 tokens, outputs 16-256 (``ignore_eos``), all
submitted at once — through:

  (a) one engine, ``AsyncEngine``, 2 intra-op threads;
  (a2) the same with twice the batch (``max_num_seqs`` 16: what the two replicas hold together);
  (b) one engine, 1 thread;
  (c) ``DataParallelEngine`` of 2 replicas, 1 thread each (each pinned to its CPU);
  (d) tensor parallelism over 2 ranks, 1 thread each.

Rounds alternate a a2 b c d. Reports generated tokens/s (load excluded), the
ratios to (a), whether every engine produced (a)'s tokens, and the router's
added latency: the core ``Router.route`` per call (least-loaded and
prefix-affinity, 2 replicas, 300-token prompts), and the time from
``submit_all`` to its return for one request on an idle server (a replica is a
pipe round trip away; a single engine is in process). JSON on the last line.

    python benches/data_parallel.py [--requests 32] [--rounds 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from spyre_cb import EngineConfig, SamplingParams, _core
from spyre_cb.async_engine import AsyncEngine
from spyre_cb.data_parallel import DataParallelEngine
from spyre_cb.engine import Engine
from spyre_cb.models import make_tiny_checkpoint


def workload(n: int, vocab: int, quick: bool) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    hi_p, hi_o = (120, 48) if quick else (400, 256)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randrange(16, hi_p))], rng.randrange(16, hi_o)) for _ in range(n)
    ]


async def _run(front: Any, work: list[tuple[list[int], int]]) -> tuple[float, list[list[int]]]:
    jobs = [
        (ids, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True), f"r{i}")
        for i, (ids, m) in enumerate(work)
    ]
    t0 = time.perf_counter()
    streams = await front.submit_all(jobs)
    outs: list[list[int]] = []
    for s in streams:
        toks: list[int] = []
        async for o in s:
            toks += o.new_token_ids
        outs.append(toks)
    return time.perf_counter() - t0, outs


async def _submit_latency(front: Any, n: int = 30) -> float:
    """Median seconds from submit_all to its return, one request, nothing else running."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        (s,) = await front.submit_all([([5, 6, 7], SamplingParams(max_tokens=1), f"lat{i}-{time.time_ns()}")])
        times.append(time.perf_counter() - t0)
        async for _ in s:
            pass
    return statistics.median(times)


def make(kind: str, config: EngineConfig) -> Any:
    if kind == "dp2":
        return DataParallelEngine(config.replace(num_threads=1), 2)
    if kind == "tp2":
        return AsyncEngine(Engine(config=config.replace(tensor_parallel_size=2, num_threads=1)))
    if kind == "one_2t_seqs16":
        return AsyncEngine(Engine(config=config.replace(num_threads=2, max_num_seqs=16)))
    return AsyncEngine(Engine(config=config.replace(num_threads=2 if kind == "one_2t" else 1)))


def _count_hits(hits: list[int], replica: int, report: Any) -> None:
    hits[0] += report.prefix_hit_blocks
    hits[1] += report.prefix_hit_requests


def prefix_hits(
    path: str, n_requests: int, rules: tuple[str, ...] = ("round-robin", "least-loaded", "prefix-affinity")
) -> dict[str, dict[str, float]]:
    """Prefix-cache hits of 2 replicas (chunked policy, prefix caching, 64 blocks
    each) per routing rule, on a shared-system-prompt workload: 12 system prompts
    of 320 tokens (5 blocks: 60 in all, more than one replica's pool keeps
    besides its running requests, not more than two), each request one of them
    plus 8-40 tokens of its own, 16 tokens out, sent in waves of 8 every 50 ms."""
    rng = random.Random(2)
    systems = [[rng.randrange(3, 500) for _ in range(320)] for _ in range(12)]
    work = [
        (rng.choice(systems) + [rng.randrange(3, 500) for _ in range(rng.randrange(8, 40))], 16)
        for _ in range(n_requests)
    ]
    config = EngineConfig(
        model=path,
        max_num_seqs=4,
        max_model_len=1024,
        available_blocks=128,
        num_threads=1,
        policy="chunked",
        chunk_size=64,
        prefix_caching=True,
    )
    out = {}
    for rule in rules:
        with DataParallelEngine(config, 2, router=rule) as dp:
            hits = [0, 0]
            dp.on_report.append(functools.partial(_count_hits, hits))

            async def run() -> float:
                t0 = time.perf_counter()
                streams = []
                for w in range(0, len(work), 8):
                    jobs = [
                        (ids, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True), f"p{i}")
                        for i, (ids, m) in enumerate(work[w : w + 8], start=w)
                    ]
                    streams += await dp.submit_all(jobs)
                    await asyncio.sleep(0.05)
                for st in streams:
                    async for _ in st:
                        pass
                return time.perf_counter() - t0

            secs = asyncio.run(run())
            spread = [r.requests for r in dp.status()]
        usable = sum((len(ids) - 1) // _core.BLOCK_SIZE for ids, _ in work)  # a hit leaves the last token
        out[rule] = {
            "hit_blocks": hits[0],
            "hit_requests": hits[1],
            "usable_prompt_blocks": usable,
            "requests_per_replica": spread,
            "seconds": round(secs, 2),
        }
        print(f"prefix workload, {rule}: {hits[0]} of {usable} blocks from the cache, {spread}", flush=True)
    return out


def router_cost(calls: int = 20000) -> dict[str, float]:
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(300)] for _ in range(64)]
    out = {}
    for rule in ("least-loaded", "prefix-affinity"):
        r = _core.Router(rule, 2, 4096)
        t0 = time.perf_counter()
        for i in range(calls):
            r.route([i % 3, (i + 1) % 3], prompts[i % 64])
        out[rule] = (time.perf_counter() - t0) / calls * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the tiny model, a short workload (a smoke run)")
    a = ap.parse_args(argv)
    kinds = ("one_2t", "dp2") if a.quick else ("one_2t", "one_2t_seqs16", "one_1t", "dp2", "tp2")
    results: dict[str, dict[str, Any]] = {k: {"tokens_per_s": [], "load_s": []} for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            path = make_tiny_checkpoint(Path(tmp) / "m")
            n = min(a.requests, 8)
        else:
            path = make_tiny_checkpoint(
                Path(tmp) / "m", num_layers=4, hidden_size=768, num_heads=12, num_kv_heads=4, vocab_size=8192
            )
            n = a.requests
        config = EngineConfig(model=str(path), max_num_seqs=8, max_model_len=1024, available_blocks=256)
        work = workload(n, 500, a.quick)  # ids every tiny tokenizer has
        n_tokens = sum(m for _, m in work)
        ref: list[list[int]] | None = None
        same: dict[str, bool] = {}
        latency: dict[str, float] = {}
        for _ in range(a.rounds):
            for kind in kinds:
                t0 = time.perf_counter()
                front = make(kind, config)
                results[kind]["load_s"].append(time.perf_counter() - t0)
                try:
                    secs, outs = asyncio.run(_run(front, work))
                    if kind in ("one_1t", "one_2t", "dp2"):
                        latency[kind] = asyncio.run(_submit_latency(front))
                finally:
                    front.shutdown()
                results[kind]["tokens_per_s"].append(n_tokens / secs)
                if ref is None:
                    ref = outs
                same[kind] = same.get(kind, True) and outs == ref
                print(f"{kind}: {n_tokens} tokens in {secs:.2f} s = {n_tokens / secs:.0f} tokens/s", flush=True)
    best = {k: max(v["tokens_per_s"]) for k, v in results.items()}
    summary = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_1m": os.getloadavg()[0]},
        "dtype": "float32",
        "requests": n,
        "generated_tokens": n_tokens,
        "engines": {
            k: {
                "tokens_per_s": round(best[k], 1),
                "vs_one_engine_2_threads": round(best[k] / best["one_2t"], 3),
                "load_s": round(min(results[k]["load_s"]), 2),
                "tokens_identical_to_one_engine": same[k],
            }
            for k in kinds
        },
        "router_route_us": {k: round(v, 2) for k, v in router_cost().items()},
        "submit_latency_ms": {k: round(v * 1e3, 3) for k, v in latency.items()},
    }
    if not a.quick:  # (tests/test_data_parallel.py runs it on 48 requests)
        with tempfile.TemporaryDirectory() as tmp:
            small = make_tiny_checkpoint(Path(tmp) / "m")
            summary["prefix_workload"] = prefix_hits(str(small), 96)
    print("| engine | tokens/s | vs one engine, 2 threads | load s | same tokens |")
    print("|---|---|---|---|---|")
    for k, v in summary["engines"].items():
        print(
            f"| {k} | {v['tokens_per_s']} | {v['vs_one_engine_2_threads']}x | {v['load_s']} | "
            f"{v['tokens_identical_to_one_engine']} |"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
