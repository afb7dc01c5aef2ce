"""End-to-end throughput: spyre_cb continuous batching vs HF static batching.

One seeded workload (prompts 16-448 tokens, 8-128 new tokens, all queued at
t=0) on a random-weight Granite large enough that the model dominates, run
three ways in the same process:

  (a) spyre_cb, eager, native paged attention (the default: decodes read the
      KV blocks in place through the Rust kernel)
  (a') with --ablate: spyre_cb with the vectorized torch ops (gather + SDPA),
      to measure the kernel's gain in the same run
  (b) spyre_cb, eager, FMS's own reference paged-attention ops
  (c) transformers static batching: batches of max_num_seqs in arrival order,
      left-padded generate(); only each request's own max_tokens count as useful
  (d) transformers' own continuous batching (``init_continuous_batching``,
      paged attention): the same KV capacity in tokens, at most max_num_seqs
      requests per batch, each request its own max_new_tokens

Prints generated tokens/s, time to last token, and for (a) the share of step
time spent outside the model forward (scheduling, plan conversion, input
building, sampling). ``--quick`` is a smoke run (under a minute).

    python benches/e2e.py [--quick] [--requests 64] [--blocks 1024] [--threads N]
                          [--contention] [--json PATH] [--skip-fms] [--ablate]

``--contention`` runs a CPU-burning process beside the measurement (bounded
in time, stopped at the end), as another tenant of the same cores would.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import spyre_cb
from spyre_cb import SamplingParams
from spyre_cb.cpus import intra_op_threads
from spyre_cb.models import make_tiny_checkpoint
from spyre_cb.workload import synthetic_workload


def workload(n: int, seed: int, max_prompt: int, max_new: int):
    """(prompt_len, max_tokens) pairs from the project's one generator (uniform lengths)."""
    reqs = synthetic_workload(
        n,
        seed=seed,
        max_model_len=1 << 20,
        mean_interarrival=0.0,
        prompt_range=(16, max_prompt),
        tokens_range=(8, max_new),
    )
    return [(pl, mt) for _, pl, mt in reqs]


def run_spyre(model, reqs, prompts, args, attention_ops: str, tp: int = 1):
    mml = max(args.max_model_len, -(-(max(pl + mt for pl, mt in reqs)) // 64) * 64)
    eng = spyre_cb.Engine(
        model,
        max_num_seqs=args.max_num_seqs,
        max_model_len=mml,
        available_blocks=args.blocks,
        attention_ops=attention_ops,
        tensor_parallel_size=tp,
        backend=args.backend,
        num_threads=args.threads if tp == 1 and args.fixed_threads else None,
    )
    forward_time = 0.0
    inner = eng.runner._forward

    def timed_forward(*a, **kw):
        nonlocal forward_time
        t = time.perf_counter()
        out = inner(*a, **kw)
        forward_time += time.perf_counter() - t
        return out

    eng.runner._forward = timed_forward
    # warm-up (one short request) so one-time costs are not counted
    t_warm = time.perf_counter()
    eng.add_request("warm", prompts[0][:16], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    eng.step()
    if args.backend != "eager":
        # a whole untimed pass first: the compiler meets every shape the workload has
        for i, ((_pl, mt), p) in enumerate(zip(reqs, prompts)):
            eng.add_request(f"w{i}", p, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        eng.step()
        print(f"({args.backend}: warm-up pass with compilation {time.perf_counter() - t_warm:.1f} s)")
    forward_time = 0.0
    t0 = time.perf_counter()
    for i, ((_pl, mt), p) in enumerate(zip(reqs, prompts)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
    done: dict[str, float] = {}
    steps = 0
    batch_sizes = []
    while eng.has_unfinished_requests():
        outs = eng.step()
        if eng.last_plan_kind == "decode":
            batch_sizes.append(len(outs))
        for o in outs:
            if o.finished:
                done[o.request_id] = time.perf_counter() - t0
        steps += 1
    total = time.perf_counter() - t0
    tokens = {str(i): eng.get_request(str(i)).output_token_ids for i in range(len(reqs))}
    stats = dict(getattr(eng.executor, "stats", {}))
    eng.shutdown()
    return dict(
        total=total,
        steps=steps,
        ttlt=list(done.values()),
        tokens=tokens,
        outside_share=1.0 - forward_time / total,
        mean_batch=statistics.mean(batch_sizes) if batch_sizes else 0.0,
        executor=stats,
    )


def run_hf(model_dir, reqs, prompts, args):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    pad = 0
    # warm-up
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    t0 = time.perf_counter()
    ttlt, tokens = [], {}
    b = args.max_num_seqs
    for start in range(0, len(reqs), b):
        idx = list(range(start, min(start + b, len(reqs))))
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        new = max(reqs[i][1] for i in idx)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        end = time.perf_counter() - t0
        for row, i in enumerate(idx):
            tokens[str(i)] = out[row, width : width + reqs[i][1]].tolist()
            ttlt.append(end)
    return dict(total=time.perf_counter() - t0, ttlt=ttlt, tokens=tokens)


def run_hf_cb(model_dir, reqs, prompts, args):
    """(d) transformers' continuous batching manager, greedy, each request its own max_new_tokens."""
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=max(m for _, m in reqs))
    cbc = ContinuousBatchingConfig(page_size=64, num_blocks=args.blocks, max_requests_per_batch=args.max_num_seqs)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    try:
        mgr.add_request(prompts[0][:16], request_id="warm", max_new_tokens=2)
        mgr.get_result(request_id="warm", timeout=600)
        t0 = time.perf_counter()
        for i, ((_pl, mt), p) in enumerate(zip(reqs, prompts)):
            mgr.add_request(p, request_id=str(i), max_new_tokens=mt)
        ttlt, tokens = [], {}
        while len(tokens) < len(reqs):
            out = mgr.get_result(timeout=1200)
            if out is None or out.request_id == "warm":
                continue
            tokens[out.request_id] = list(out.generated_tokens)
            ttlt.append(time.perf_counter() - t0)
        total = time.perf_counter() - t0
    finally:
        mgr.stop(block=True)
    return dict(total=total, ttlt=ttlt, tokens=tokens)


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def report(name, r, useful):
    tps = useful / r["total"]
    print(
        f"{name:<38} {tps:>9.1f} tok/s   total {r['total']:>7.2f} s   "
        f"time to last token mean {statistics.mean(r['ttlt']):>6.2f} s, p90 {sorted(r['ttlt'])[int(0.9 * (len(r['ttlt']) - 1))]:>6.2f} s"
    )
    return tps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="spyre_cb end-to-end benchmark")
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 requests, small model, under a minute")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1024, help="KV blocks in the pool (FMS reference ops scale with it)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fms", action="store_true", help="skip (b), the slow reference ops")
    ap.add_argument("--max-prompt", type=int, default=448, help="prompts are 16..max-prompt tokens")
    ap.add_argument("--max-new", type=int, default=128, help="new tokens are 8..max-new")
    ap.add_argument(
        "--max-model-len", type=int, default=0, help="engine max_model_len (default: the smallest that fits)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of every run (default: the available CPUs, spyre_cb's governed)",
    )
    ap.add_argument(
        "--backend", default="eager", choices=["eager", "inductor"], help="spyre_cb's backend for (a) and (b)"
    )
    ap.add_argument(
        "--contention", action="store_true", help="run a CPU-burning process beside the measurement (bounded)"
    )
    ap.add_argument("--skip-hf-cb", action="store_true", help="skip (d), transformers' continuous batching")
    ap.add_argument(
        "--ablate", action="store_true", help="also run (a') with the vectorized torch ops: the native kernel's gain"
    )
    ap.add_argument("--json", metavar="PATH", help="write tokens/s of each run and the settings as JSON")
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="also run (a) over N ranks (gloo) and report TP=N vs TP=1 and the plan broadcast per step",
    )
    args = ap.parse_args(argv)
    # every run starts with the same intra-op threads (by default the available
    # CPUs; spyre_cb then governs its own, as it does when num_threads is not set)
    args.fixed_threads = bool(args.threads)
    args.threads = intra_op_threads(args.threads or None)
    torch.set_num_threads(args.threads)
    burner = None
    if args.contention:
        burner = multiprocessing.get_context("spawn").Process(target=_burn, args=(1800.0,), daemon=True)
        burner.start()
    try:
        return _main(args)
    finally:
        if burner is not None:
            burner.terminate()
            burner.join(10)


def _main(args) -> int:
    max_prompt, max_new = args.max_prompt, args.max_new
    if args.quick:
        args.requests, args.layers, args.hidden, args.blocks = 12, 2, 256, 128
        max_prompt, max_new = 200, 24
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_checkpoint(
            Path(tmp) / "bench",
            seed=args.seed,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.hidden // 64,
            num_kv_heads=max(1, args.hidden // 128),
            vocab_size=512,
        )
        reqs = workload(args.requests, args.seed, max_prompt, max_new)
        g = torch.Generator().manual_seed(args.seed + 1)
        prompts = [torch.randint(0, 500, (pl,), generator=g).tolist() for pl, _ in reqs]
        useful = sum(mt for _, mt in reqs)
        print(
            f"{args.requests} requests (prompts {min(p for p, _ in reqs)}-{max(p for p, _ in reqs)}, "
            f"new tokens {min(m for _, m in reqs)}-{max(m for _, m in reqs)}, {useful} useful tokens), "
            f"batch {args.max_num_seqs}, Granite {args.layers} layers hidden {args.hidden}, "
            f"{args.blocks} KV blocks, max_model_len {max(args.max_model_len, -(-(max(p + m for p, m in reqs)) // 64) * 64)}, "
            f"torch threads {torch.get_num_threads()}{'' if args.fixed_threads else ' (spyre_cb: governed)'}, contention {'on' if args.contention else 'off'}"
        )
        a = run_spyre(model, reqs, prompts, args, "native")
        c = run_hf(model, reqs, prompts, args)
        ta = report("(a) spyre_cb continuous, native ops", a, useful)
        ta0 = None
        if args.ablate:
            a0 = run_spyre(model, reqs, prompts, args, "vectorized")
            ta0 = report("(a') spyre_cb, vectorized torch ops", a0, useful)
            print(
                f"tokens identical (a vs a'): {sum(a['tokens'][k] == a0['tokens'][k] for k in a['tokens'])}/{len(reqs)}"
            )
            print(f"native kernel's gain (a)/(a'): {ta / ta0:.2f}x")
        b = None
        if not args.skip_fms:
            b = run_spyre(model, reqs, prompts, args, "fms")
            tb = report("(b) spyre_cb continuous, FMS ref ops", b, useful)
        tc = report("(c) HF transformers static batching", c, useful)
        same = sum(a["tokens"][k] == c["tokens"][k] for k in a["tokens"])
        print(f"tokens identical to HF (a vs c): {same}/{len(reqs)} requests")
        d = td = None
        if not args.skip_hf_cb:
            d = run_hf_cb(model, reqs, prompts, args)
            td = report("(d) HF transformers continuous batching", d, useful)
            print(
                f"tokens identical (d vs c): {sum(d['tokens'][k] == c['tokens'][k] for k in c['tokens'])}/{len(reqs)}"
            )
            print(f"(a)/(d) throughput: {ta / td:.2f}x")
        if b is not None:
            print(
                f"tokens identical (a vs b): {sum(a['tokens'][k] == b['tokens'][k] for k in a['tokens'])}/{len(reqs)}"
            )
        print(f"(a)/(c) throughput: {ta / tc:.2f}x")
        if b is not None:
            print(f"(a)/(b) throughput: {ta / tb:.2f}x")
        print(
            f"(a) share of step time outside the model forward: {100 * a['outside_share']:.1f}% over {a['steps']} steps"
        )
        print(f"(a) mean decode batch size: {a['mean_batch']:.2f} of {args.max_num_seqs}")
        if args.json:
            doc = {
                "a": {"tokens_per_s": ta},
                "c": {"tokens_per_s": tc},
                "threads": torch.get_num_threads(),
                "contention": bool(args.contention),
                "requests": len(reqs),
                "outside_share": a["outside_share"],
            }
            if b is not None:
                doc["b"] = {"tokens_per_s": tb}
            if ta0 is not None:
                doc["a_vectorized"] = {"tokens_per_s": ta0}
            if td is not None:
                doc["d"] = {"tokens_per_s": td}
            Path(args.json).write_text(json.dumps(doc, indent=1))
            print(f"wrote {args.json}")
        if args.tensor_parallel_size > 1:
            n = args.tensor_parallel_size
            t = run_spyre(model, reqs, prompts, args, "native", tp=n)
            tt = report(f"(a) spyre_cb, tensor_parallel_size={n}", t, useful)
            same = sum(a["tokens"][k] == t["tokens"][k] for k in a["tokens"])
            st = t["executor"]
            print(f"tokens identical (TP={n} vs TP=1): {same}/{len(reqs)}")
            print(f"TP={n} / TP=1 throughput: {tt / ta:.2f}x")
            print(
                f"plan broadcast: {1e6 * st['broadcast_s'] / st['steps']:.0f} us per step, "
                f"{100 * st['broadcast_s'] / st['forward_s']:.1f}% of rank 0's forward "
                f"({1e3 * st['forward_s'] / st['steps']:.1f} ms per step)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
