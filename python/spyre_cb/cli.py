"""The ``spyre-cb`` command: demo, generate, simulate."""

from __future__ import annotations

import argparse
import json
import sys
import time

from spyre_cb.errors import SpyreCBError

DEMO_PROMPTS = [
    ("The river was higher than", 24, 0),
    ("A continuous batching engine keeps", 40, 0),
    ("Numbers help people reason about capacity:", 12, 2),
    ("Morning light came through the kitchen window while", 30, 5),
    ("def add(a, b):", 8, 9),
    ("Questions are welcome. Which road leads to", 20, 14),
    ("The key value cache is cut into blocks of sixty four slots. A block belongs to one sequence at a time. "
     "When a sequence finishes, its blocks return to the pool and", 16, 20),
    ("Good software is", 10, 26),
]


def _limits(p: argparse.ArgumentParser, seqs: int, mml: int) -> None:
    p.add_argument("--max-num-seqs", type=int, default=seqs, help=f"decode batch size (default {seqs})")
    p.add_argument("--max-model-len", type=int, default=mml, help=f"longest sequence, a multiple of 64 (default {mml})")
    p.add_argument("--available-blocks", type=int, default=None, help="usable KV blocks (default: max_num_seqs * max_model_len / 64)")
    p.add_argument("--max-batch-tkv-limit", type=int, default=None, help="batch x tkv limit (default: max_model_len * max_num_seqs)")


def _limit_kwargs(a) -> dict:
    return dict(
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
        available_blocks=a.available_blocks,
        max_batch_tkv_limit=a.max_batch_tkv_limit,
    )


def _table_header() -> str:
    return f"{'step':>5} {'kind':<8} {'tkv':>5}  {'waiting':<16} {'running':<20} {'blocks r/u':>10}"


def _table_row(rec, kind: str) -> str:
    w = ",".join(rec.waiting) if len(rec.waiting) <= 6 else f"{len(rec.waiting)} requests"
    r = ",".join(rec.running) if len(rec.running) <= 8 else f"{len(rec.running)} requests"
    return f"{rec.step:>5} {kind:<8} {rec.tkv:>5}  {w:<16} {r:<20} {rec.n_reserved_blocks:>4}/{rec.n_used_blocks:<5}"


def cmd_demo(a) -> int:
    from spyre_cb.engine import Engine
    from spyre_cb.models import tiny_model_path
    from spyre_cb.sampling import SamplingParams

    t0 = time.perf_counter()
    path = tiny_model_path()
    eng = Engine(path, seed=a.seed, **_limit_kwargs(a))
    print(f"tiny random-weight Granite at {path} (built offline; its text is noise by design)")
    print(
        f"max_num_seqs={a.max_num_seqs} max_model_len={a.max_model_len} blocks={eng.scheduler.n_blocks} "
        f"max_batch_tkv_limit={eng.scheduler.max_batch_tkv_limit}\n"
    )
    print(_table_header())
    pending = [(arr, str(i), text, mt) for i, (text, mt, arr) in enumerate(DEMO_PROMPTS)]
    step = 0
    while pending or eng.has_unfinished_requests() or eng.snapshot().tkv:
        if step > 0:
            eng.step()
        for item in [x for x in pending if x[0] <= step]:
            pending.remove(item)
            _, rid, text, mt = item
            eng.add_request(rid, prompt=text, sampling_params=SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
        print(_table_row(eng.snapshot(), eng.last_plan_kind or "-"))
        step += 1
    print("\ngenerated:")
    for i, (text, mt, arr) in enumerate(DEMO_PROMPTS):
        s = eng.get_request(str(i))
        out = s.output_text(eng.tokenizer).replace("\n", "\\n")
        print(f"  [{i}] arrives at step {arr:>2}, prompt {len(s.prompt_token_ids):>3} tokens, {len(s.output_token_ids):>2} new: {out!r}")
    print(f"\n{step - 1} steps in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_generate(a) -> int:
    from spyre_cb.llm import LLM
    from spyre_cb.sampling import SamplingParams

    llm = LLM(a.model, backend=a.backend, seed=a.seed, **_limit_kwargs(a))
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        stop=a.stop or None,
        ignore_eos=a.ignore_eos,
    )
    outs = llm.generate(a.prompt, params, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        if a.json:
            print(json.dumps({"prompt": o.prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}))
        else:
            print(f"{o.prompt}{c.text}")
            print(f"-- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}", file=sys.stderr)
    return 0


def cmd_simulate(a) -> int:
    from spyre_cb.simulate import simulate
    from spyre_cb.stats import simulate_stats
    from spyre_cb.workload import load_workload, synthetic_workload

    if (a.workload is None) == (a.synthetic is None):
        raise SystemExit("spyre-cb simulate: give a WORKLOAD file or --synthetic N (one of them)")
    if a.synthetic is not None:
        reqs = synthetic_workload(
            a.synthetic, seed=a.seed, max_model_len=a.max_model_len, mean_interarrival=a.mean_interarrival,
            prompt_median=a.prompt_median, tokens_median=a.tokens_median,
        )
    else:
        reqs = load_workload(a.workload)
    limits = _limit_kwargs(a)
    stats = simulate_stats(reqs, **limits)
    summary = stats.summary()
    show_table = a.table or (stats.n_steps <= a.table_max and not a.summary)
    records = None
    if show_table or (a.json and stats.n_steps <= a.table_max):
        records = simulate(reqs, **limits)
    if show_table:
        kinds = ["-"] + [("idle", "prefill", "decode")[k] for k in stats.kind[1:]]
        print(_table_header())
        for rec, kind in zip(records, kinds):
            print(_table_row(rec, kind))
        print()
    for rid, why in stats.rejected.items():
        print(f"rejected request {rid}: {why}", file=sys.stderr)
    print(_format_summary(summary))
    if a.json:
        doc = {"config": limits, "summary": summary, "rejected": stats.rejected}
        if records is not None:
            doc["steps"] = [r.to_dict() for r in records]
        else:
            doc["columns"] = {k: getattr(stats, k).tolist() for k in ("tkv", "n_running", "n_waiting", "n_reserved_blocks", "n_used_blocks")}
        with open(a.json, "w") as f:
            json.dump(doc, f)
        print(f"wrote {a.json}")
    if a.plot:
        stats.plot(a.plot)
        print(f"wrote {a.plot}")
    return 0


def _format_summary(s: dict) -> str:
    lines = [
        f"requests          {s['requests']} ({s['rejected']} rejected)",
        f"steps             {s['steps']} ({s['prefill_steps']} prefill, {s['decode_steps']} decode, {s['idle_steps']} idle)",
        f"tokens generated  {s['tokens']}",
        f"mean batch size   {s['mean_batch_size']:.2f} (decode steps)",
        f"padding share     {100 * s['padding_share']:.1f}% of computed KV slots",
        f"blocks high-water {s['max_used_blocks']} used, {s['max_reserved_blocks']} reserved of {s['n_blocks']}",
        f"queueing delay    mean {s['queue_delay_mean']:.1f}, p50 {s['queue_delay_p50']:.0f}, "
        f"p95 {s['queue_delay_p95']:.0f}, max {s['queue_delay_max']} steps",
        f"latency           mean {s['latency_mean']:.1f} steps from arrival to last token",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spyre-cb", description="Continuous batching for static-shape accelerators (IBM Spyre).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a staggered workload on the offline tiny model and show every step",
                       description="Builds the tiny random-weight model offline, runs a staggered mixed-length "
                                   "workload through continuous batching and prints every step and the outputs.")
    _limits(d, 4, 256)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generates text with continuous batching for each --prompt.")
    g.add_argument("--model", default="tiny", help="Hugging Face checkpoint directory, or 'tiny' (default)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--backend", default="eager", choices=["eager", "inductor", "sendnn"])
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    _limits(g, 4, 512)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("simulate", help="model-free: run a workload through the exact scheduler",
                       description="Runs a workload through the scheduler without a model and reports what "
                                   "continuous batching would do: per-step table or summary, JSON, and a plot.")
    s.add_argument("workload", nargs="?", help="JSON list or JSONL of [arrival_step, prompt_len, max_tokens]")
    s.add_argument("--synthetic", type=int, metavar="N", help="generate N requests instead of reading a file")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    s.add_argument("--mean-interarrival", type=float, default=16.0, help="synthetic: mean steps between arrivals")
    s.add_argument("--prompt-median", type=float, default=200.0, help="synthetic: median prompt length")
    s.add_argument("--tokens-median", type=float, default=100.0, help="synthetic: median max_tokens")
    s.add_argument("--json", metavar="OUT", help="write the summary (and steps) as JSON")
    s.add_argument("--plot", metavar="OUT.png", help="draw tkv, batch size, waiting and blocks over steps")
    s.add_argument("--table", action="store_true", help="always print the per-step table")
    s.add_argument("--summary", action="store_true", help="never print the per-step table")
    s.add_argument("--table-max", type=int, default=200, help="longest run shown as a table (default 200 steps)")
    _limits(s, 8, 2048)
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpyreCBError as e:
        print(f"spyre-cb {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
