"""The ``spyre-cb`` command: demo, generate, simulate, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from spyre_cb._core import StepRecord, __version__
from spyre_cb.config import EngineConfig, any_int, nonneg_int
from spyre_cb.errors import SpyreCBError
from spyre_cb.fleet import ROUTERS
from spyre_cb.params import SamplingParams
from spyre_cb.server.options import ServerOptions
from spyre_cb.stats import describe_wait

DEMO_PROMPTS = [
    ("The river was higher than", 24, 0),
    ("A continuous batching engine keeps", 40, 0),
    ("Numbers help people reason about capacity:", 12, 2),
    ("Morning light came through the kitchen window while", 30, 5),
    ("def add(a, b):", 8, 9),
    ("Questions are welcome. Which road leads to", 20, 14),
    (
        "The key value cache is cut into blocks of sixty four slots. A block belongs to one sequence at a time. "
        "When a sequence finishes, its blocks return to the pool and",
        16,
        20,
    ),
    ("Good software is", 10, 26),
]


def _table_header() -> str:
    return f"{'step':>5} {'kind':<8} {'tkv':>5}  {'waiting':<16} {'running':<20} {'blocks r/u':>10}"


def _table_row(rec: StepRecord, kind: str) -> str:
    w = ",".join(rec.waiting) if len(rec.waiting) <= 6 else f"{len(rec.waiting)} requests"
    r = ",".join(rec.running) if len(rec.running) <= 8 else f"{len(rec.running)} requests"
    return f"{rec.step:>5} {kind:<8} {rec.tkv:>5}  {w:<16} {r:<20} {rec.n_reserved_blocks:>4}/{rec.n_used_blocks:<5}"


def cmd_demo(a: argparse.Namespace) -> int:
    from spyre_cb.engine import Engine
    from spyre_cb.sampling import SamplingParams

    t0 = time.perf_counter()
    config = EngineConfig.from_cli(a)
    if config.model == "tiny":
        config = config.with_model_path()
        print(f"tiny random-weight Granite at {config.model} (built offline; its text is noise by design)")
    eng = Engine(config=config)
    c = config.scheduler
    policy = f"policy={c.policy}"
    if c.policy == "chunked":
        policy += (
            f" chunk_size={c.chunk_size} interleave={c.interleave} decode_pausing={c.decode_pausing} "
            f"prefix_caching={c.prefix_caching}"
        )
    print(
        f"max_num_seqs={c.max_num_seqs} max_model_len={c.max_model_len} blocks={c.available_blocks} "
        f"max_batch_tkv_limit={c.max_batch_tkv_limit} {policy}\n"
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
            eng.add_request(
                rid, prompt=text, sampling_params=SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True)
            )
        print(_table_row(eng.snapshot(), eng.last_plan_kind or "-"))
        step += 1
    print("\ngenerated:")
    for i, (_text, _mt, arr) in enumerate(DEMO_PROMPTS):
        s = eng.get_request(str(i))
        out = s.output_text(eng.tokenizer).replace("\n", "\\n")
        print(
            f"  [{i}] arrives at step {arr:>2}, prompt {len(s.prompt_token_ids):>3} tokens, {len(s.output_token_ids):>2} new: {out!r}"
        )
    print(f"\n{step - 1} steps in {time.perf_counter() - t0:.1f} s")
    return 0


#: The SamplingParams fields `generate` exposes, with their help; defaults come from SamplingParams itself.
SAMPLING_HELP = {
    "max_tokens": "most new tokens per completion (0 or 'none': up to max_model_len)",
    "n": "completions per prompt",
    "temperature": "sampling temperature; below 1e-5 is greedy",
    "top_k": "sample from the k most likely tokens (0: all)",
    "top_p": "sample from the smallest set holding this much probability",
    "min_p": "drop tokens less likely than min_p x the most likely one (0: off)",
    "presence_penalty": "subtracted from the logit of every token already generated",
    "frequency_penalty": "subtracted per occurrence of a token already generated",
    "repetition_penalty": "divides positive / multiplies negative logits of prompt and output tokens (1: off)",
    "min_tokens": "EOS and stop ids cannot end a completion before this many tokens",
    "stop": "stop string (repeatable)",
    "stop_token_ids": "stop token id (repeatable)",
    "ignore_eos": "keep generating after the model's EOS",
    "logprobs": "also report the top-k logprobs of every generated token (--json)",
    "prompt_logprobs": "also report the top-k logprobs of every prompt token (--json)",
    "include_stop_str_in_output": "keep the matched stop string in the text",
    "skip_special_tokens": "leave special tokens out of the text",
}


def _max_tokens(text: str) -> int | None:
    if text.lower() in ("0", "none"):
        return None
    return any_int(text)  # SamplingParams names the limit of a negative one


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams option, with the API's defaults."""
    group = parser.add_argument_group("sampling options (SamplingParams)")
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    for name, help_text in SAMPLING_HELP.items():
        default = fields[name].default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            if default:
                group.add_argument(
                    f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=f"do not {help_text}"
                )
            else:
                group.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif name in ("stop", "stop_token_ids"):
            group.add_argument(
                flag, dest=name, action="append", type=nonneg_int if name == "stop_token_ids" else str, help=help_text
            )
        elif name == "max_tokens":
            group.add_argument(
                flag, dest=name, type=_max_tokens, default=default, help=f"{help_text} (default: {default})"
            )
        else:
            kind = float if isinstance(default, float) else any_int  # SamplingParams names each limit
            shown = "none" if default is None else default
            group.add_argument(
                flag,
                dest=name,
                type=kind,
                default=default,
                metavar="X" if kind is float else "N",
                help=f"{help_text} (default: {shown})",
            )


def _prompts(a: argparse.Namespace) -> list[str]:
    prompts = list(a.prompt or [])
    if a.prompt_file:
        try:
            text = sys.stdin.read() if a.prompt_file == "-" else Path(a.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompts from {a.prompt_file!r}: {e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("give at least one --prompt, or --prompt-file FILE (one prompt per line; - for stdin)")
    return prompts


def cmd_generate(a: argparse.Namespace) -> int:
    from spyre_cb.llm import LLM

    prompts = _prompts(a)
    params = SamplingParams(**{name: getattr(a, name) for name in SAMPLING_HELP})
    config = EngineConfig.from_cli(a)
    if config.backend != "eager":
        print(
            f"compiling the model with torch.compile ({config.backend}): the first steps take longer ...",
            file=sys.stderr,
            flush=True,
        )
    llm = LLM(config=config)
    if a.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, o in zip(prompts, outs):
        for c in o.outputs:
            if a.json:
                doc: dict[str, Any] = {
                    "prompt": prompt,
                    "index": c.index,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                }
                if c.logprobs is not None:
                    doc["cumulative_logprob"] = c.cumulative_logprob
                    doc["logprobs"] = [{str(t): lp.logprob for t, lp in pos.items()} for pos in c.logprobs]
                if o.prompt_logprobs is not None:
                    doc["prompt_logprobs"] = [
                        None if pos is None else {str(t): lp.logprob for t, lp in pos.items()}
                        for pos in o.prompt_logprobs
                    ]
                print(json.dumps(doc))
            else:
                print(f"{prompt}{c.text}")
                print(f"-- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}", file=sys.stderr)
    return 0


def cmd_simulate(a: argparse.Namespace) -> int:
    from spyre_cb.simulate import simulate
    from spyre_cb.stats import simulate_stats
    from spyre_cb.workload import load_workload, synthetic_workload

    if (a.workload is None) == (a.synthetic is None):
        raise UsageError("give a WORKLOAD file or --synthetic N (one of them)")
    config = EngineConfig.scheduler_from_cli(a)
    for path, suffixes in ((a.json, (".json",)), (a.plot, (".png", ".svg", ".pdf"))):
        if path:
            _check_writable(path, suffixes)
    if a.synthetic is not None:
        reqs = synthetic_workload(
            a.synthetic,
            seed=a.seed,
            max_model_len=config.max_model_len,
            mean_interarrival=a.mean_interarrival,
            prompt_median=a.prompt_median,
            tokens_median=a.tokens_median,
        )
    else:
        reqs = load_workload(a.workload)
    if a.replicas is not None or a.target_ttft_p99 is not None or a.target_itl_p99 is not None:
        return _simulate_fleet(a, reqs, config)
    stats = simulate_stats(reqs, config)
    summary = stats.summary()
    show_table = a.table or (stats.n_steps <= a.table_max and not a.summary)
    records = None
    if show_table or (a.json and stats.n_steps <= a.table_max):
        records = simulate(reqs, config)
    if show_table and records is not None:
        kind_of = {int(st): int(k) for st, k in zip(stats.step, stats.kind)}
        print(_table_header())
        for rec in records:
            kind = "-" if rec.step == 0 else ("idle", "prefill", "decode")[kind_of.get(rec.step, 0)]
            print(_table_row(rec, kind))
        print()
    for rid, why in stats.rejected.items():
        print(f"rejected request {rid}: {why}", file=sys.stderr)
    print(_format_summary(summary))
    if a.json:
        doc: dict[str, Any] = {"config": config.to_dict(), "summary": summary, "rejected": stats.rejected}
        if records is not None:
            doc["steps"] = [r.to_dict() for r in records]
        else:
            doc["columns"] = {
                k: getattr(stats, k).tolist()
                for k in ("step", "span", "tkv", "n_running", "n_waiting", "n_reserved_blocks", "n_used_blocks")
            }
        with open(a.json, "w") as f:
            json.dump(doc, f)
        print(f"wrote {a.json}")
    if a.plot:
        stats.plot(a.plot)
        print(f"wrote {a.plot}")
    return 0


def _simulate_fleet(a: argparse.Namespace, reqs: Any, config: Any) -> int:
    """``simulate --replicas N``: the fleet's table; with a target, the fewest replicas that meet it."""
    from spyre_cb.fleet import fleet_size, simulate_fleet

    if a.target_ttft_p99 is not None or a.target_itl_p99 is not None:
        found = fleet_size(
            reqs,
            config,
            ttft_p99=a.target_ttft_p99,
            itl_p99=a.target_itl_p99,
            router=a.router,
            max_replicas=a.replicas or 16,
        )
        if found is None:
            print(f"no fleet of up to {a.replicas or 16} replicas meets the targets")
            return 1
        n, stats = found
        print(f"fewest replicas meeting the targets: {n}")
    else:
        stats = simulate_fleet(reqs, config, replicas=a.replicas, router=a.router)
    for i, why in stats.rejected:
        print(f"rejected request {i}: {why}", file=sys.stderr)
    print(stats.summary())
    if a.json:
        doc = {"config": config.to_dict(), "router": stats.router, "steps": stats.steps, "latency": stats.latency}
        doc["replicas"] = stats.replicas
        doc["assignment"] = stats.assignment
        with open(a.json, "w") as f:
            json.dump(doc, f)
        print(f"wrote {a.json}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from spyre_cb.server import serve
    except ImportError as e:
        raise UsageError(f"serving needs the server extras: pip install 'spyre_cb[serve]' ({e})") from None
    if a.model_pos is not None:
        a.model = a.model_pos
    config = EngineConfig.from_cli(a).with_model_path()
    name = a.served_model_name or (a.model if a.model in ("tiny", "tiny-embed") else str(config.model))
    options = ServerOptions.from_cli(a, served_model_name=name)
    print(f"serving {name!r} on http://{options.host}:{options.port}/v1 (policy {config.policy})", flush=True)
    serve(config, options)
    return 0


class UsageError(Exception):
    """A command-line mistake argparse cannot see (exit status 2)."""


def _check_writable(path: str, suffixes: tuple[str, ...]) -> None:
    """Fails before a long simulation, not after it, for an output that cannot be written."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{path!r}: the file name must end in {' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{path!r} is a directory")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write {path!r}: permission denied")


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
    t, i = s.get("ttft_steps") or {}, s.get("itl_steps") or {}
    if t:
        lines.append(f"time to 1st token mean {t['mean']:.1f}, p50 {t['p50']:.0f}, p99 {t['p99']:.0f} steps")
    if i:
        lines.append(f"inter-token       mean {i['mean']:.2f}, p50 {i['p50']:.0f}, p99 {i['p99']:.0f} steps")
    if s.get("policy") == "chunked":
        lines.append(
            f"decode pauses     {s['pause_events']} (longest {s['max_pause_steps']} steps); "
            f"prefix cache saved {s['prefix_cached_blocks']} block prefills"
        )
    waits = sorted(((k, v) for k, v in s.get("waits_by_reason", {}).items() if v), key=lambda kv: -kv[1])
    if waits:
        lines.append("queue head waited")
        lines += [f"  {n:>8} steps: {describe_wait(k)}" for k, n in waits]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spyre-cb", description="Continuous batching for static-shape accelerators (IBM Spyre)."
    )
    p.add_argument("--version", action="version", version=f"spyre-cb {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="run a staggered workload on the offline tiny model and show every step",
        description="Builds the tiny random-weight model offline, runs a staggered mixed-length "
        "workload through continuous batching and prints every step and the outputs.",
    )
    EngineConfig.add_cli_args(d)  # the API's defaults, as every engine command
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generates text with continuous batching for each --prompt.",
    )
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--prompt-file", metavar="FILE", help="read prompts from FILE, one per line (- for stdin)")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per completion on stdout")
    _add_sampling_args(g)
    EngineConfig.add_cli_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "simulate",
        help="model-free: run a workload through the exact scheduler",
        description="Runs a workload through the scheduler without a model and reports what "
        "continuous batching would do: per-step table or summary, JSON, and a plot.",
    )
    s.add_argument("workload", nargs="?", help="JSON list or JSONL of [arrival_step, prompt_len, max_tokens]")
    s.add_argument("--synthetic", type=int, metavar="N", help="generate N requests instead of reading a file")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of the synthetic workload")
    s.add_argument("--mean-interarrival", type=float, default=16.0, help="synthetic: mean steps between arrivals")
    s.add_argument("--prompt-median", type=float, default=200.0, help="synthetic: median prompt length")
    s.add_argument("--tokens-median", type=float, default=100.0, help="synthetic: median max_tokens")
    s.add_argument("--json", metavar="OUT", help="write the summary (and steps) as JSON")
    s.add_argument("--plot", metavar="OUT.png", help="draw tkv, batch size, waiting and blocks over steps")
    s.add_argument("--table", action="store_true", help="always print the per-step table")
    s.add_argument("--summary", action="store_true", help="never print the per-step table")
    s.add_argument("--table-max", type=int, default=200, help="longest run shown as a table (default 200 steps)")
    s.add_argument(
        "--replicas", type=any_int, metavar="N", help="a fleet of N schedulers behind --router (fleet sizing)"
    )
    s.add_argument(
        "--router", choices=ROUTERS, default="least-loaded", help="how a fleet routes requests (default least-loaded)"
    )
    s.add_argument("--target-ttft-p99", type=float, metavar="STEPS", help="find the fewest replicas meeting this")
    s.add_argument("--target-itl-p99", type=float, metavar="STEPS", help="find the fewest replicas meeting this")
    EngineConfig.add_cli_args(s, only_scheduler=True, defaults={"max_num_seqs": 8, "max_model_len": 2048})
    s.set_defaults(func=cmd_simulate)

    v = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serves MODEL (a checkpoint directory, or 'tiny') at /v1/completions, /v1/chat/completions, "
        "/v1/models, /health and /metrics, streaming or not; an embedding model (an encoder checkpoint, or "
        "'tiny-embed') at /v1/embeddings.",
    )
    v.add_argument(
        "model_pos", nargs="?", metavar="MODEL", help="checkpoint directory, 'tiny' or 'tiny-embed' (or --model)"
    )
    ServerOptions.add_cli_args(v)
    EngineConfig.add_cli_args(v)
    v.set_defaults(func=cmd_serve)
    return p


def _launched(a: argparse.Namespace) -> bool:
    """Whether torchrun started this process for a command that runs a model."""
    return "TORCHELASTIC_RUN_ID" in os.environ and a.command in ("demo", "generate", "serve")


def _launched_worker(a: argparse.Namespace) -> int | None:
    """Under torchrun, every rank runs the same command: ranks > 0 serve rank 0's
    plans (:func:`spyre_cb.launched.run_worker`) and exit; None for rank 0 (and
    without a launcher), which runs the command."""
    if not _launched(a):
        return None
    from spyre_cb.launched import launched_rank, run_worker

    got = launched_rank()
    if got is None or got[0] == 0:
        return None
    if getattr(a, "model_pos", None) is not None:
        a.model = a.model_pos
    return run_worker(EngineConfig.from_cli(a))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if _launched(args):
        _end_launched(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        worker = _launched_worker(args)
        if worker is not None:
            return worker
        return int(args.func(args))
    except (SpyreCBError, UsageError) as e:
        print(f"spyre-cb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spyre-cb {args.command}: interrupted", file=sys.stderr)
        return 130


def _end_launched(code: int) -> None:
    """Ends a rank torchrun started, once its work is done: the exit handlers run (rank 0's
    stops the other ranks and leaves the group), then the process ends without the
    interpreter's teardown and C++ static destructors, where a torch.distributed thread
    still joinable made ``std::terminate`` abort a run that had printed the right answer."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
