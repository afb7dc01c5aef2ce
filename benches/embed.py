"""Embedding throughput: spyre_cb's Embedder against transformers on the same checkpoint.

Builds a random-weight encoder checkpoint with the shapes of
granite-embedding-125m-english (RoBERTa: 12 layers, hidden 768, 12 heads,
FFN 3072, vocabulary 50265, 512 positions; CLS pooling, normalised) — or,
with ``--quick``, the tiny test encoder — and embeds the same inputs of mixed
lengths with:

  (a) spyre_cb: ``Embedder.embed_token_ids`` (the core's static-shape
      batches: rows padded to a multiple of 64, grouped by that length);
  (b) transformers: ``AutoModel`` in batches of ``--batch`` inputs in arrival
      order, each padded to its longest input (dynamic padding), CLS pooled
      and normalised;
  (c) the same with the inputs sorted by length first, as
      sentence-transformers' ``encode`` batches them.

Runs alternate a b c a b c; reports inputs/s, padded-token overhead and the
lowest cosine between the two engines' embeddings, as JSON on the last line.

    python benches/embed.py [--inputs 256] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spyre_cb import _core
from spyre_cb.embedding import Embedder
from spyre_cb.models import make_tiny_encoder_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="rows per batch (both engines)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the tiny encoder, few inputs (a smoke run)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            path = make_tiny_encoder_checkpoint(Path(tmp) / "enc")
            n, longest = min(a.inputs, 24), 200
        else:
            path = make_tiny_encoder_checkpoint(
                Path(tmp) / "enc", num_layers=12, hidden_size=768, num_heads=12, vocab_size=50265
            )
            n, longest = a.inputs, 512
        emb = Embedder(path, max_num_seqs=a.batch, max_model_len=512, num_threads=a.threads)
        hf = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
        rng = random.Random(0)
        inputs = [[rng.randrange(5, emb.vocab_size) for _ in range(rng.randint(8, longest))] for _ in range(n)]
        tokens = sum(len(x) for x in inputs)
        plan = _core.plan_pooling([len(x) for x in inputs], emb.config.scheduler)
        padded_a = sum(len(rows) * p for rows, p in plan)
        batches = [inputs[i : i + a.batch] for i in range(0, n, a.batch)]
        padded_b = sum(len(b) * max(len(x) for x in b) for b in batches)
        by_len = sorted(range(n), key=lambda i: -len(inputs[i]))
        sorted_batches = [[inputs[i] for i in by_len[k : k + a.batch]] for k in range(0, n, a.batch)]
        padded_c = sum(len(b) * max(len(x) for x in b) for b in sorted_batches)

        def run_a() -> torch.Tensor:
            return emb.embed_token_ids(inputs)

        @torch.inference_mode()
        def run_b(bs: list[list[list[int]]]) -> torch.Tensor:
            out = []
            for b in bs:
                width = max(len(x) for x in b)
                ids = torch.full((len(b), width), emb.pad_id, dtype=torch.long)
                mask = torch.zeros(len(b), width, dtype=torch.long)
                for r, x in enumerate(b):
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
                out.append(torch.nn.functional.normalize(h[:, 0].float(), dim=-1))
            return torch.cat(out)

        # warm-up: one batch each (first calls allocate and pick kernels)
        emb.embed_token_ids(inputs[: a.batch])
        run_b(batches[:1])
        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        got: dict[str, torch.Tensor] = {}
        runs = (("a", run_a), ("b", lambda: run_b(batches)), ("c", lambda: run_b(sorted_batches)))
        for _ in range(a.repeats):
            for name, fn in runs:
                t = time.perf_counter()
                got[name] = fn()
                times[name].append(time.perf_counter() - t)
        unsorted = torch.empty_like(got["c"])
        unsorted[torch.tensor(by_len)] = got["c"]
        cos = min(
            torch.nn.functional.cosine_similarity(got["a"], other, dim=-1).min().item()
            for other in (got["b"], unsorted)
        )
    ta, tb, tc = (statistics.median(times[k]) for k in "abc")
    shape = "tiny" if a.quick else "granite-embedding-125m-english shapes"
    load = os.getloadavg()[0]
    print(f"{n} inputs, {tokens} tokens (8-{longest} each), {shape}, float32, {a.threads} thread(s), load {load:.2f}")
    print(f"(a) spyre_cb Embedder: {n / ta:8.1f} inputs/s  padded tokens {padded_a} ({len(plan)} static-shape batches)")
    print(f"(b) transformers     : {n / tb:8.1f} inputs/s  padded tokens {padded_b} ({len(batches)} batches)")
    print(f"(c) transformers, by length: {n / tc:8.1f} inputs/s  padded tokens {padded_c}")
    print(f"(a)/(b) throughput: {tb / ta:.2f}x; (a)/(c): {tc / ta:.2f}x; lowest cosine between them: {cos:.6f}")
    result = {
        "inputs": n,
        "tokens": tokens,
        "threads": a.threads,
        "load": round(load, 2),
        "spyre_cb": {"inputs_per_s": n / ta, "padded_tokens": padded_a, "batches": len(plan)},
        "transformers": {"inputs_per_s": n / tb, "padded_tokens": padded_b, "batches": len(batches)},
        "transformers_sorted": {"inputs_per_s": n / tc, "padded_tokens": padded_c},
        "ratio": tb / ta,
        "ratio_sorted": tc / ta,
        "min_cosine": cos,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
