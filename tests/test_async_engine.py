"""AsyncEngine in-process: tokens and text deltas, no state outliving its
delivery, abort storms leaking no blocks, both policies."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

import spyre_cb
from conftest import random_prompts
from spyre_cb import SamplingParams
from spyre_cb.async_engine import AsyncEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _wait_idle(aeng: AsyncEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = aeng.engine.snapshot()
        if not aeng.engine.has_unfinished_requests() and snap.n_used_blocks == 0 and not aeng.engine.requests:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {aeng.engine.snapshot()} {list(aeng.engine.requests)}")


@pytest.mark.parametrize("policy", [{}, {"policy": "chunked", "chunk_size": 64, "prefix_caching": True}])
def test_streams_match_hf_and_release_everything(tiny_model, hf_greedy, policy):
    aeng = AsyncEngine(spyre_cb.Engine(tiny_model, max_num_seqs=3, max_model_len=256, **policy))
    prompts = random_prompts([5, 70, 130, 20, 9], aeng.engine.vocab_size, seed=11)

    async def one(p, n):
        toks, text, final = [], "", None
        async for o in aeng.generate(p, SamplingParams(max_tokens=n, **GREEDY)):
            toks += o.new_token_ids
            text += o.text or ""
            final = o
        return toks, text, final

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(p, 6 + i) for i, p in enumerate(prompts))), 120)

    try:
        results = asyncio.run(main())
        tok = aeng.engine.tokenizer
        for (toks, text, final), p, i in zip(results, prompts, range(len(prompts))):
            assert toks == hf_greedy(p, 6 + i)
            assert text == tok.decode(toks)
            assert final.finished and final.finish_reason == "length"
        _wait_idle(aeng)  # nothing outlives its delivery
    finally:
        aeng.shutdown()


def test_abort_storm_leaks_nothing(tiny_model):
    aeng = AsyncEngine(spyre_cb.Engine(tiny_model, max_num_seqs=4, max_model_len=256))
    rng = random.Random(3)
    prompts = random_prompts([rng.randint(1, 120) for _ in range(40)], aeng.engine.vocab_size, seed=12)

    async def one(i, p):
        stop_after = rng.choice([0, 1, 3, None, None])
        got = 0
        async for o in aeng.generate(p, SamplingParams(max_tokens=30, **GREEDY), request_id=f"r{i}"):
            got += len(o.new_token_ids)
            if stop_after is not None and got >= stop_after:
                break  # the consumer leaves: the request is aborted
        return got

    async def main():
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        await asyncio.sleep(0.05)
        for t in tasks[::7]:
            t.cancel()  # cancelled mid-wait, as a dropped connection cancels a handler
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 180)

    try:
        results = asyncio.run(main())
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) >= 1
        _wait_idle(aeng)
        aeng.engine.scheduler.check_invariants()
    finally:
        aeng.shutdown()


def test_invalid_request_is_refused_and_nothing_queued(tiny_model):
    aeng = AsyncEngine(spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128))

    async def main():
        with pytest.raises(spyre_cb.InvalidRequestError, match="max_model_len"):
            aeng.submit(list(range(100)), SamplingParams(max_tokens=100))
        out = [o async for o in aeng.generate([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))]
        return out

    try:
        outs = asyncio.run(main())
        # a reader that falls behind gets waiting outputs merged: count tokens, not outputs
        assert sum(len(o.new_token_ids) for o in outs) == 2 and outs[-1].finished
        _wait_idle(aeng)
    finally:
        aeng.shutdown()
