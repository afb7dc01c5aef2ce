"""Load on the OpenAI-compatible server: N concurrent streaming clients with
Poisson arrivals, against ``spyre-cb serve`` in a subprocess on loopback.

Reports throughput (generated tokens/s), time to first token and inter-token
latency (p50/p99, measured by the clients), and the server path's overhead:
the same requests driven through the engine directly (``Engine.step()`` in a
loop, all queued at once) in the same run.

    python benches/serve_load.py [--clients 16] [--requests 64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import spyre_cb
from spyre_cb import SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(v: list[float], p: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(-(-p * len(s) // 1)) - 1))] if s else 0.0


def workload(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    words = "the river road leads over the hill to a small town where people make bread".split()
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))), rng.randint(16, 96)) for _ in range(n)]


class Seen:
    """What the clients saw: tokens (from the usage chunks), TTFT and ITL."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def chunk(self, t0: float, last: float | None, usage_tokens: int, has_choices: bool) -> float | None:
        now = time.perf_counter()
        self.tokens += usage_tokens
        if not has_choices:
            return last
        if last is None:
            self.ttft.append(now - t0)
        else:
            self.itl.append(now - last)
        return now

    def result(self, wall: float) -> dict:
        return {"tokens": self.tokens, "wall": wall, "ttft": self.ttft, "itl": self.itl}


async def arrive(reqs, rate: float, rng: random.Random, one) -> float:
    """Starts ``one(prompt, max_tokens)`` per request (Poisson arrivals at ``rate``
    per second, or all at once); returns the wall time until all finished."""
    t0 = time.perf_counter()
    tasks = []
    for prompt, mt in reqs:
        tasks.append(asyncio.create_task(one(prompt, mt)))
        if rate > 0:
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def drive_server(base: str, reqs, clients: int, rate: float, seed: int, raw: bool = False) -> dict:
    import openai

    if raw:
        return await drive_raw(base, reqs, clients, rate, seed)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(clients)
    rng = random.Random(seed)
    seen = Seen()

    async def one(prompt: str, mt: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            last = None
            stream = await client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=mt,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                last = seen.chunk(t0, last, chunk.usage.completion_tokens if chunk.usage else 0, bool(chunk.choices))

    wall = await arrive(reqs, rate, rng, one)
    await client.close()
    return seen.result(wall)


async def drive_raw(base: str, reqs, clients: int, rate: float, seed: int) -> dict:
    """The same load from a minimal SSE reader (httpx, one json.loads per
    chunk): separates the server's cost from the openai client's."""
    import json

    import httpx

    sem = asyncio.Semaphore(clients)
    rng = random.Random(seed)
    seen = Seen()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def one(prompt: str, mt: int) -> None:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": mt, "temperature": 0, "stream": True}
            body.update(ignore_eos=True, stream_options={"include_usage": True})
            async with sem:
                t0 = time.perf_counter()
                last = None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        usage = chunk["usage"]["completion_tokens"] if chunk.get("usage") else 0
                        last = seen.chunk(t0, last, usage, bool(chunk["choices"]))

        wall = await arrive(reqs, rate, rng, one)
    return seen.result(wall)


def drive_engine(model: str, reqs, max_num_seqs: int, threads: int) -> dict:
    eng = spyre_cb.Engine(model, max_num_seqs=max_num_seqs, num_threads=threads)
    tok = eng.tokenizer
    for i, (prompt, mt) in enumerate(reqs):
        eng.add_request(str(i), tok(prompt).input_ids, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    tokens = 0
    while eng.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in eng.step())
    return {"tokens": tokens, "wall": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="load on spyre-cb serve")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streams")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument(
        "--rate", type=float, default=0.0, help="arrivals per second (0: all at once, bounded by --clients)"
    )
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the direct run")
    ap.add_argument("--layers", type=int, default=0, help="serve a random-weight Granite this deep (0: the tiny model)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--raw-client", action="store_true", help="a minimal SSE reader instead of the openai client")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.clients = 8, 4
    reqs = workload(args.requests, 0)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SPYRE_CB_CACHE=cache, OMP_NUM_THREADS=str(args.threads))
        os.environ["SPYRE_CB_CACHE"] = cache
        import torch

        torch.set_num_threads(args.threads)
        from spyre_cb.models import make_tiny_checkpoint, tiny_model_path

        if args.layers:
            h = args.hidden
            model = str(
                make_tiny_checkpoint(
                    Path(cache) / "granite",
                    seed=0,
                    num_layers=args.layers,
                    hidden_size=h,
                    num_heads=h // 64,
                    num_kv_heads=max(1, h // 128),
                )
            )
        else:
            model = str(tiny_model_path())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "spyre_cb", "serve", model, "--served-model-name", "tiny", "--port", str(port)]
        cmd += ["--max-num-seqs", str(args.max_num_seqs), "--num-threads", str(args.threads)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("server did not start") from None
                    time.sleep(0.2)
            asyncio.run(drive_server(base, reqs[: min(4, len(reqs))], args.clients, 0, 1))  # warm-up
            srv = asyncio.run(drive_server(base, reqs, args.clients, args.rate, 0, raw=args.raw_client))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        drive_engine(model, reqs[:4], args.max_num_seqs, args.threads)  # warm-up
        direct = drive_engine(model, reqs, args.max_num_seqs, args.threads)
    s_tps = srv["tokens"] / srv["wall"]
    d_tps = direct["tokens"] / direct["wall"]
    what = f"Granite {args.layers} layers hidden {args.hidden}" if args.layers else "tiny model"
    print(
        f"{len(reqs)} requests, {args.clients} concurrent streams, max_num_seqs {args.max_num_seqs}, {what}, "
        f"torch threads {args.threads}, rate {args.rate or 'all at once'}"
    )
    client = "minimal SSE reader" if args.raw_client else "openai client"
    print(
        f"server ({client}): {srv['tokens']} tokens in {srv['wall']:.2f} s = {s_tps:.0f} tokens/s; "
        f"TTFT p50 {1e3 * pct(srv['ttft'], 0.5):.0f} ms p99 {1e3 * pct(srv['ttft'], 0.99):.0f} ms; "
        f"ITL p50 {1e3 * pct(srv['itl'], 0.5):.1f} ms p99 {1e3 * pct(srv['itl'], 0.99):.1f} ms"
    )
    print(f"engine : {direct['tokens']} tokens in {direct['wall']:.2f} s = {d_tps:.0f} tokens/s (Engine.step() loop)")
    print(f"server / engine tokens/s: {s_tps / d_tps:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
