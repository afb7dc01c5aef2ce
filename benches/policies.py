"""The two scheduling policies side by side: continuous (the published policy)
vs chunked prefill (interleaving, decode pausing), with and without prefix
caching, on two workloads:

  mixed   long prompts (900-1800 tokens) among short ones (20-200), Poisson
          arrivals: what chunking is for (running requests keep decoding while
          a long prompt is ingested)
  prefix  every prompt starts with one shared 512-token system prompt, then a
          20-100 token user part: what prefix caching is for

First through the simulator (all requests, latencies in steps), then through
the real FMS runner on a small random-weight model (fewer requests; latencies
in steps and seconds, tokens/s; an untimed warm-up round first). Every policy
runs the same requests in the same process; tokens are checked equal across
policies (greedy).

    python benches/policies.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import spyre_cb
from spyre_cb import SamplingParams
from spyre_cb.models import make_tiny_checkpoint

POLICIES = {
    "continuous": {},
    "chunked": {"policy": "chunked", "chunk_size": 256},
    "chunked+prefix": {"policy": "chunked", "chunk_size": 256, "prefix_caching": True},
}


def workload(kind: str, n: int, seed: int, vocab: int, interarrival: float) -> list[dict]:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(512)]
    step = 0.0
    out = []
    for i in range(n):
        step += rng.expovariate(1.0 / interarrival) if interarrival > 0 else 0.0
        if kind == "mixed":
            long = rng.random() < 0.25
            plen = rng.randint(900, 1800) if long else rng.randint(20, 200)
            prompt = [rng.randrange(vocab) for _ in range(plen)]
        else:
            prompt = system + [rng.randrange(vocab) for _ in range(rng.randint(20, 100))]
        out.append(
            {"id": str(i), "arrival_step": int(step), "prompt_token_ids": prompt, "max_tokens": rng.randint(16, 128)}
        )
    return out


def pct(v: list[float], p: float) -> float:
    if not v:
        return 0.0
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(-(-p * len(s) // 1)) - 1))]


def simulate(reqs: list[dict], limits: dict) -> dict[str, dict]:
    out = {}
    for name, opts in POLICIES.items():
        st = spyre_cb.simulate_stats(reqs, **limits, **opts)
        s = st.summary()
        out[name] = {
            "steps": s["steps"],
            "prefill steps": s["prefill_steps"],
            "TTFT p50/p99": f"{s['ttft_steps']['p50']:.0f} / {s['ttft_steps']['p99']:.0f}",
            "ITL mean/p99": f"{s['itl_steps']['mean']:.2f} / {s['itl_steps']['p99']:.0f}",
            "pauses": s["pause_events"],
            "cached block prefills saved": s["prefix_cached_blocks"],
        }
    return out


def run_engine(model: Path, reqs: list[dict], limits: dict, opts: dict) -> dict:
    eng = spyre_cb.Engine(model, **limits, **opts, num_threads=torch.get_num_threads())
    pending = sorted(reqs, key=lambda r: r["arrival_step"])
    arrival_t: dict[str, float] = {}
    arrival_s: dict[str, int] = {}
    tok_t: dict[str, list[float]] = {r["id"]: [] for r in reqs}
    tok_s: dict[str, list[int]] = {r["id"]: [] for r in reqs}
    step = 0
    t0 = time.perf_counter()
    prefill_steps = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0]["arrival_step"] <= step:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
            eng.add_request(r["id"], r["prompt_token_ids"], params)
            arrival_t[r["id"]] = time.perf_counter()
            arrival_s[r["id"]] = step
        step += 1
        outs = eng.step()
        prefill_steps += eng.last_plan_kind in ("prefill", "chunk")
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                tok_t[o.request_id].append(now)
                tok_s[o.request_id].append(step)
    wall = time.perf_counter() - t0
    ttft_t = [tok_t[i][0] - arrival_t[i] for i in tok_t]
    ttft_s = [tok_s[i][0] - arrival_s[i] for i in tok_s]
    itl_t = [b - a for v in tok_t.values() for a, b in zip(v, v[1:])]
    itl_s = [b - a for v in tok_s.values() for a, b in zip(v, v[1:])]
    tokens = {r["id"]: eng.get_request(r["id"]).output_token_ids for r in reqs}
    eng.shutdown()
    n_tok = sum(len(v) for v in tokens.values())
    return {
        "tokens": tokens,
        "row": {
            "steps": step,
            "prefill steps": prefill_steps,
            "TTFT p50/p99 (steps)": f"{pct(ttft_s, 0.5):.0f} / {pct(ttft_s, 0.99):.0f}",
            "ITL p50/p99 (steps)": f"{pct(itl_s, 0.5):.0f} / {pct(itl_s, 0.99):.0f}",
            "TTFT p50/p99 (s)": f"{pct(ttft_t, 0.5):.2f} / {pct(ttft_t, 0.99):.2f}",
            "ITL p50/p99 (ms)": f"{1e3 * pct(itl_t, 0.5):.1f} / {1e3 * pct(itl_t, 0.99):.1f}",
            "tokens/s": f"{n_tok / wall:.0f}",
            "wall s": f"{wall:.1f}",
        },
    }


def table(title: str, rows: dict[str, dict]) -> None:
    cols = list(next(iter(rows.values())))
    print(f"\n{title}")
    print("| policy | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="continuous vs chunked policy")
    ap.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--sim-requests", type=int, default=400)
    ap.add_argument("--requests", type=int, default=24, help="requests through the real runner")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sim_requests, args.requests = 60, 6
    torch.set_num_threads(args.threads)
    limits = {"max_num_seqs": 8, "max_model_len": 2048, "available_blocks": 512}
    print(f"limits {limits}; chunk_size 256; torch threads {torch.get_num_threads()}")

    for kind in ("mixed", "prefix"):
        reqs = workload(kind, args.sim_requests, args.seed, 512, interarrival=12.0)
        table(f"simulator, workload {kind}: {len(reqs)} requests (steps)", simulate(reqs, limits))
    # a tight volume limit: the continuous policy refuses admission, the chunked one pauses decodes
    tight = dict(limits, max_batch_tkv_limit=4096)
    reqs = workload("mixed", args.sim_requests, args.seed, 512, interarrival=12.0)
    table(f"simulator, workload mixed, max_batch_tkv_limit 4096: {len(reqs)} requests (steps)", simulate(reqs, tight))

    with tempfile.TemporaryDirectory() as d:
        model = make_tiny_checkpoint(Path(d) / "m", seed=1, num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4)
        for kind in ("mixed", "prefix"):
            reqs = workload(kind, args.requests, args.seed + 1, 512, interarrival=6.0)
            rows, first = {}, None
            # one untimed round first, so that no policy pays torch's warm-up
            for opts in POLICIES.values():
                run_engine(model, reqs[: max(2, len(reqs) // 4)], limits, opts)
            for name, opts in POLICIES.items():
                r = run_engine(model, reqs, limits, opts)
                rows[name] = r["row"]
                first = first or r["tokens"]
                same = sum(first[i] == r["tokens"][i] for i in first)
                rows[name]["same tokens"] = f"{same}/{len(first)}"
            table(f"real runner (FMS, eager, 4 layers x 256), workload {kind}: {len(reqs)} requests", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
