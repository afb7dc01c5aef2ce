"""This project's CPU paged-attention ops (native kernel, vectorized torch) against FMS's own reference ops."""

from __future__ import annotations

import pytest
import torch

import spyre_cb
from conftest import random_prompts
from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.plan import IdlePlan
from spyre_cb.runner import ModelRunner


@pytest.mark.parametrize("ops", ["native", "vectorized"])
@pytest.mark.parametrize("available_blocks", [None, 200])
def test_ops_match_fms_reference(tiny_model, available_blocks, ops):
    sched = spyre_cb.Scheduler(max_num_seqs=3, max_model_len=256, available_blocks=available_blocks)
    cfg = EngineConfig(str(tiny_model), **sched.config.to_dict())
    ckpt = Checkpoint.open(tiny_model)
    fast = ModelRunner(ckpt, cfg.replace(attention_ops=ops))
    ref = ModelRunner(ckpt, cfg.replace(attention_ops="fms"))
    # joins at block boundaries and mid-block, a shift (prompt 150 > tkv)
    reqs = {0: [(30, 40)], 3: [(100, 20)], 6: [(150, 12)], 30: [(5, 9)]}
    vocab = fast.vocab_size
    worst = 0.0
    n_steps = 0
    prompts = iter(random_prompts([100] * 8, vocab, seed=7))
    k = 0
    for step in range(200):
        for pl, mt in reqs.get(step, []):
            sched.add_request(str(k), next(prompts)[:pl], mt)
            k += 1
        plan = sched.schedule()
        if isinstance(plan, IdlePlan):
            sched.update([])
            if not sched.has_unfinished_requests() and step > 30:
                break
            continue
        a = fast.execute(plan)
        b = ref.execute(plan)
        worst = max(worst, (a - b).abs().max().item())
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        sched.update(a.argmax(-1).tolist())
        n_steps += 1
    assert worst <= 1e-4, worst
    assert n_steps > 40 and k == 4


def test_engines_with_either_ops_give_the_same_tokens(tiny_model):
    from engine_harness import run_engine

    reqs = [(0, 49, 20), (0, 70, 8), (4, 130, 10)]
    outs = []
    for ops in ("native", "vectorized", "fms"):
        eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256, attention_ops=ops)
        outs.append(run_engine(eng, reqs, seed=3)[2])
    assert outs[0] == outs[1] == outs[2]
