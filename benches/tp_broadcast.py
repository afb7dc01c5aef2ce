"""Cost of sending a step plan to the other tensor-parallel ranks (gloo, loopback).

Two ways, in one run: one pickled plan object per step
(``broadcast_object_list``) and the plan's arrays packed into int64 tensors
(a fixed-size header broadcast, then one payload broadcast: what
``TensorParallelExecutor`` does, as it measured faster). Decode plans of batch 8 (block tables 8 x 9) and
prefill plans of 256 tokens from the real scheduler.

    python benches/tp_broadcast.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spyre_cb
from spyre_cb.executor import broadcast_plan, receive_plan


def plans():
    s = spyre_cb.Scheduler(8, 1024)
    for i in range(8):
        s.add_request(str(i), [7] * (256 if i == 0 else 30 + 40 * i), 400)
    out = {"prefill": None, "decode": None}
    for _ in range(30):
        p = s.schedule()
        out[p.kind] = out[p.kind] or p
        s.update([1] * len(p.request_ids))
    return out["prefill"], out["decode"]


def run(rank: int, world: int, port: int, steps: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    prefill, decode = plans()
    timings = {}
    for name, plan in (("prefill", prefill), ("decode", decode)):
        for how in ("pickled object", "packed tensors"):
            dist.barrier()
            t = []
            for _ in range(steps):
                t0 = time.perf_counter()
                if how == "pickled object":
                    box = [plan if rank == 0 else None]
                    dist.broadcast_object_list(box, src=0)
                elif rank == 0:
                    broadcast_plan(plan)
                else:
                    receive_plan()
                t.append(time.perf_counter() - t0)
            timings[(name, how)] = statistics.median(t)
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run, args=(r, 2, port, a.steps, results)) for r in range(2)]
    for p in procs:
        p.start()
    timings = results.get(timeout=600)
    for p in procs:
        p.join(30)
    for (name, how), sec in timings.items():
        print(
            f"{name:<8} {how:<15} {1e6 * sec:8.1f} us per broadcast (median of {a.steps}, 2 ranks, gloo, {os.cpu_count()} cores)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
