"""Structured outputs: decode step time with 0 / 50 / 100 % constrained rows,
and grammar compile time per spec, cold and cached, on a 100k vocabulary.

The model is a random-weight Granite (``--hidden``, ``--layers``) whose
tokenizer is a synthetic byte-level BPE of ``--vocab`` tokens (the 256 bytes,
JSON punctuation, numbers, whitespace runs and word-like pieces, as a real
100k vocabulary has), so the grammar engine scans a vocabulary of real size.
Constrained rows follow a JSON schema (bounded strings, an enum, integers,
nested arrays), sampled at temperature 1; the others sample freely. For each
batch size and share, the median over timed decode steps (only steps that run
the whole batch) of the step, of the sampler's part of it, and of the grammar
work in it (the matchers' bitmask fill, its unpack and application to the
logits, which also makes the sampler's working copy, and the matchers' advance); the least
of ``--rounds`` interleaved rounds, as the host is shared.

    python benches/structured.py [--batches 8 32] [--steps 20] [--hidden 768 --layers 4] [--vocab 100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import spyre_cb
from spyre_cb import SamplingParams, StructuredOutputsParams, models
from spyre_cb.structured import GrammarCompiler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "scores": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}},
    },
    "required": ["name", "age", "role", "tags", "address", "scores"],
    "additionalProperties": False,
}
SPECS = {
    "json schema (6 fields, nested)": StructuredOutputsParams(json=SCHEMA),
    "json schema, no free whitespace": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
    "json_object": StructuredOutputsParams(json_object=True),
    "regex (e-mail)": StructuredOutputsParams(regex=r"[a-z]{3,12}@[a-z]{2,8}\.(com|org|net)"),
    "choice (4)": StructuredOutputsParams(choice=["red", "green", "blue", "yellow"]),
}


def synthetic_tokenizer(size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of ``size`` tokens (a vocabulary only: no merges)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte <-> printable character map (the ByteLevel pre-tokenizer's)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    b2u = {b: chr(c) for b, c in zip(bs, cs)}

    def enc(s: str) -> str:
        return "".join(b2u[b] for b in s.encode())

    rng = random.Random(seed)
    vocab: dict[str, int] = {"<|pad|>": 0, "<|endoftext|>": 1}
    for b in range(256):
        vocab.setdefault(b2u[b], len(vocab))
    for p in ['{"', '":', '",', '"}', '":"', '": "', '", "', "},", "}]", "[{", '": [', '":{', "\n", "\n  ", "  "]:
        vocab.setdefault(enc(p), len(vocab))
    while len(vocab) < size:
        r = rng.random()
        if r < 0.1:
            s = str(rng.randrange(1000))
        elif r < 0.15:
            s = rng.choice(" \n\t") * rng.randint(2, 16)
        elif r < 0.2:
            s = "".join(rng.choice('{}[]",:.-_ ') for _ in range(rng.randint(2, 4)))
        else:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
            w = w.capitalize() if rng.random() < 0.1 else w
            s = " " + w if rng.random() < 0.6 else w
        vocab.setdefault(enc(s), len(vocab))
    tk = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|pad|>", "<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def checkpoint(directory: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random-weight Granite whose tokenizer is the synthetic one."""
    real = models.build_tokenizer
    models.build_tokenizer = lambda vocab_size, add_bos=False: synthetic_tokenizer(vocab_size)  # type: ignore[assignment]
    try:
        return models.make_tiny_checkpoint(
            directory, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64)
        )
    finally:
        models.build_tokenizer = real


def compile_times(tok: Any, vocab: int) -> None:
    t0 = time.perf_counter()
    g = GrammarCompiler(tok, vocab, [1])
    print(f"tokenizer scan (once per engine): {(time.perf_counter() - t0) * 1e3:.0f} ms")
    print(f"{'spec':34} {'cold ms':>8} {'cached us':>10}")
    for name, spec in SPECS.items():
        t0 = time.perf_counter()
        g.compile(spec)
        cold = time.perf_counter() - t0
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            g.compile(spec)
        cached = (time.perf_counter() - t0) / reps
        print(f"{name:34} {cold * 1e3:8.1f} {cached * 1e6:10.1f}")


def step_times(eng: spyre_cb.Engine, batch: int, share: float, steps: int) -> tuple[float, float, float]:
    """Median decode step, sampler and grammar time (ms: the masks' fill, unpack and
    application, the matchers' advance) of a full batch, ``share`` of it constrained."""
    n_cons = round(batch * share)
    so = SPECS["json schema (6 fields, nested)"]
    for i in range(batch):
        p = SamplingParams(
            max_tokens=steps + 40,
            temperature=1.0,
            seed=i,
            ignore_eos=True,
            structured_outputs=so if i < n_cons else None,
        )
        eng.add_request(f"{batch}-{share}-{i}", prompt=f"Record {i}:", sampling_params=p)
    times: dict[str, float] = {}
    reals = {name: getattr(eng.sampler, name) for name in ("sample", "_apply_grammars", "_advance")}

    def timed(name: str) -> Any:
        def run(*a: Any) -> Any:
            t0 = time.perf_counter()
            out = reals[name](*a)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return out

        return run

    for name in reals:
        setattr(eng.sampler, name, timed(name))
    step, samp, gram = [], [], []
    try:
        for _ in range(batch + steps + 10):
            times.clear()
            t0 = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - t0
            if eng.last_plan_kind == "decode" and len(outs) == batch and not any(o.finished for o in outs):
                step.append(dt)
                samp.append(times.get("sample", 0.0))
                gram.append(times.get("_apply_grammars", 0.0) + times.get("_advance", 0.0))
                if len(step) >= steps:
                    break
    finally:
        for name in reals:
            delattr(eng.sampler, name)
        for rid in list(eng.requests):
            if not eng.requests[rid].finished:
                eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()
        for rid in list(eng.requests):
            eng.release(rid)
    if not step:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(step) * 1e3, statistics.median(samp) * 1e3, statistics.median(gram) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint(Path(d) / "m", args.vocab, args.hidden, args.layers)
        eng = spyre_cb.Engine(path, max_num_seqs=max(args.batches), max_model_len=512, num_threads=args.threads, seed=0)
        print(f"vocabulary {eng.vocab_size}, hidden {args.hidden}, {args.layers} layers")
        compile_times(eng.tokenizer, eng.vocab_size)
        _ = eng.grammars  # the tokenizer scan, before the timed steps
        print(
            f"\n{'batch':>5} {'constrained':>11} {'step ms':>8} {'sampler ms':>10} {'grammar ms':>10} "
            f"{'grammar/step':>12}  (min over {args.rounds} interleaved rounds of the median of {args.steps} steps)"
        )
        for b in args.batches:
            best: dict[float, tuple[float, float, float]] = {}
            for _ in range(args.rounds):  # interleaved: a busy host hits every share alike
                for share in args.shares:
                    got = step_times(eng, b, share, args.steps)
                    best[share] = min(best.get(share, got), got)
            for share in args.shares:
                step, samp, gram = best[share]
                print(f"{b:5} {share:11.0%} {step:8.2f} {samp:10.2f} {gram:10.2f} {gram / step:12.1%}")


if __name__ == "__main__":
    main()
