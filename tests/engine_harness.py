"""Runs a scenario through the Engine with a real model, the way simulate() runs it."""

from __future__ import annotations

from conftest import random_prompts
from spyre_cb import Engine, SamplingParams


def run_engine(eng: Engine, requests, seed: int = 0):
    """Feeds ``(arrival, prompt_len, max_tokens)`` requests at their steps (ids
    "0", "1", ...), observes after each step; returns (records, prompts, outputs)."""
    prompts = random_prompts([pl for _, pl, _ in requests], eng.vocab_size, seed)
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    records = []
    step = 0
    while True:
        if step > 0:
            eng.step()
        while pending and requests[pending[0]][0] <= step:
            i = pending.pop(0)
            mt = requests[i][2]
            eng.add_request(str(i), prompts[i], SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True))
        snap = eng.snapshot()
        records.append(snap)
        if not pending and not eng.has_unfinished_requests() and snap.tkv == 0 and snap.n_used_blocks == 0:
            break
        step += 1
        assert step < 100_000
    outputs = {str(i): eng.get_request(str(i)).output_token_ids for i in range(len(requests))}
    return records, prompts, outputs
