"""The ways of running a linear layer, side by side, at decode and prefill shapes.

For each weight shape (``--shapes``, ``OUTxIN``; default: granite-2b's QKV,
gate/up, down and output-head matrices) and each row count (``--rows``: a
decode batch or a prefill's tokens), times ``y = x W^T`` with this project's
native kernel (``linear_ops="native"``: weights packed once for it), oneDNN's
inner product on prepacked weights (``onednn``) and ``F.linear`` (``torch``),
best of 5 repetitions, and reports microseconds, the rate at which the
weights were read (GB/s, 10^9 bytes) and native's speed-up over oneDNN.
Weights over ~32 MB do not fit this machine's last-level cache, so their
rates are memory's; smaller ones are partly served from the cache.

JSON on the last line.

    python benches/linear_ops.py [--dtype bfloat16|float32] [--threads 1] [--rows 1 8 32 512]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

DEFAULT_SHAPES = ["3072x2048", "8192x2048", "2048x8192", "49152x2048"]


def best_of(f: Any, x: torch.Tensor, repeats: int) -> float:
    f(x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeats):
            f(x)
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="OUTxIN weight shapes")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 512])
    a = ap.parse_args(argv)
    from spyre_cb.linear import NativeLinear, PackedLinear, native_available, onednn_available

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    ops = ["torch"]
    if native_available(dtype)[0]:
        ops.insert(0, "native")
    if onednn_available(dtype)[0]:
        ops.insert(-1, "onednn")
    result: dict[str, Any] = {"dtype": a.dtype, "threads": a.threads, "ops": ops, "shapes": {}}
    for shape in a.shapes:
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False).to(dtype)
        modules = {"torch": lin}
        if "native" in ops:
            modules["native"] = NativeLinear(lin)
        if "onednn" in ops:
            modules["onednn"] = PackedLinear(lin, batch_hint=8)
        weight_gb = n * k * lin.weight.element_size() / 1e9
        rows_out: dict[str, Any] = {}
        for m in a.rows:
            x = torch.randn(m, k, dtype=dtype)
            repeats = max(1, min(20, int(2e8 // (m * n * k))))
            times = {name: best_of(f, x, repeats) for name, f in modules.items()}
            row: dict[str, Any] = {
                name: {"us": round(t * 1e6, 1), "weight_gb_s": round(weight_gb / t, 1)} for name, t in times.items()
            }
            if "native" in times and "onednn" in times:
                row["native_vs_onednn"] = round(times["onednn"] / times["native"], 2)
            rows_out[str(m)] = row
            print(f"{shape} rows={m}: {json.dumps(row)}", flush=True)
        result["shapes"][shape] = rows_out
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
