"""Fault injection: exceptions and KeyboardInterrupt at every stage of a step.

A random workload runs through the engine while faults are injected at random
into schedule, the forward, sampling, the stop checks and update (before and
after the commit). After every fault the engine must serve on: never wedged,
no block leaked, each request ends exactly once, and every request no fault
touched is token-exact against HF greedy.
"""

from __future__ import annotations

import os
import random

import spyre_cb
from conftest import random_prompts
from spyre_cb import SamplingParams

N_INJECTIONS = int(os.environ.get("SPYRE_CB_FAULT_INJECTIONS", "1000"))
STAGES = ("schedule", "execute", "sample", "stops", "update-before", "update-after")


class Injected(RuntimeError):
    pass


class FaultySchedulerProxy:
    """The real scheduler, with faults before schedule() and around update()."""

    def __init__(self, inner, faults):
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def schedule(self):
        self._faults.maybe("schedule")
        return self._inner.schedule()

    def update(self, *args):
        self._faults.maybe("update-before")
        out = self._inner.update(*args)
        self._faults.maybe("update-after")
        return out


class Faults:
    def __init__(self, rng: random.Random, rate: float):
        self.rng = rng
        self.rate = rate
        self.count = dict.fromkeys(STAGES, 0)
        self.armed = True

    def maybe(self, stage: str) -> None:
        if self.armed and self.rng.random() < self.rate:
            self.count[stage] += 1
            raise KeyboardInterrupt if self.rng.random() < 0.3 else Injected(stage)

    @property
    def total(self) -> int:
        return sum(self.count.values())


def wrap(obj, name, faults, stage):
    real = getattr(obj, name)

    def faulty(*a, **k):
        faults.maybe(stage)
        return real(*a, **k)

    setattr(obj, name, faulty)


def test_random_faults_at_every_stage(tiny_model, hf_greedy):
    rng = random.Random(2024)
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=4, max_model_len=256, available_blocks=12)
    faults = Faults(rng, rate=0.015)
    eng.scheduler = FaultySchedulerProxy(eng.scheduler, faults)
    wrap(eng.runner, "execute", faults, "execute")
    wrap(eng.sampler, "sample", faults, "sample")
    wrap(eng.processor, "stop_strings", faults, "stops")

    vocab = eng.vocab_size
    plan: dict[str, tuple[list[int], int]] = {}
    finals: dict[str, str] = {}
    next_id = 0
    steps = 0
    while faults.total < N_INJECTIONS or eng.has_unfinished_requests():
        if faults.total < N_INJECTIONS and rng.random() < 0.3:
            rid = str(next_id)
            next_id += 1
            p = random_prompts([rng.randint(1, 90)], vocab, seed=next_id)[0]
            mt = rng.randint(1, 24)
            eng.add_request(rid, p, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
            plan[rid] = (p, mt)
        faults.armed = faults.total < N_INJECTIONS
        try:
            outs = eng.step()
        except (Injected, KeyboardInterrupt):
            outs = []
        steps += 1
        assert steps < 200_000, "wedged"
        for o in outs:
            if o.finished:
                assert o.request_id not in finals, f"{o.request_id} ended twice"
                finals[o.request_id] = o.finish_reason
        eng.scheduler.check_invariants()
    eng.step()
    snap = eng.snapshot()
    assert (snap.tkv, snap.n_reserved_blocks, snap.n_used_blocks) == (0, 0, 0), snap
    assert set(finals) == set(plan), "every request ends exactly once, visibly"
    untouched = [r for r, why in finals.items() if why == "length"]
    aborted = [r for r, why in finals.items() if why == "abort"]
    assert all(eng.get_request(r).error for r in aborted)
    assert len(untouched) >= 50 and len(aborted) >= 50, (len(untouched), len(aborted))
    assert all(faults.count[s] >= N_INJECTIONS // 20 for s in STAGES), faults.count
    for rid in untouched:
        p, mt = plan[rid]
        assert eng.get_request(rid).output_token_ids == hf_greedy(p, mt), rid
    print(
        f"\n{faults.total} faults {faults.count}, {steps} steps, {len(plan)} requests: "
        f"{len(untouched)} untouched (HF-exact), {len(aborted)} aborted"
    )
