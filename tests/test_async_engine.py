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


def test_an_id_in_use_is_refused_and_the_first_request_keeps_its_outputs(tiny_model, hf_greedy):
    aeng = AsyncEngine(spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128))
    prompt = [5, 6, 7, 8]

    async def main():
        first = aeng.submit(prompt, SamplingParams(max_tokens=12, **GREEDY), request_id="same")
        with pytest.raises(spyre_cb.InvalidRequestError, match="'same' is already in use"):
            aeng.submit([1, 2], SamplingParams(max_tokens=3, **GREEDY), request_id="same")
        return [o async for o in first]

    try:
        outs = asyncio.run(asyncio.wait_for(main(), 60))
        assert [t for o in outs for t in o.new_token_ids] == hf_greedy(prompt, 12)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        _wait_idle(aeng)
    finally:
        aeng.shutdown()


def test_a_dead_executor_ends_every_stream_with_engine_dead_error(tiny_model):
    import os
    import signal

    eng = spyre_cb.Engine(tiny_model, tensor_parallel_size=2, max_num_seqs=2, max_model_len=256)
    aeng = AsyncEngine(eng)
    (worker,) = eng.executor.worker_pids

    async def main():
        streams = [aeng.submit([3 + i, 4, 5], SamplingParams(max_tokens=200, **GREEDY)) for i in range(3)]
        got = await streams[0].__anext__()  # running
        assert not got.finished
        os.kill(worker, signal.SIGKILL)
        for s in streams:  # the two running and the waiting one
            with pytest.raises(spyre_cb.EngineDeadError, match=r"the engine is dead: .*rank 1 .*exit code -9"):
                async for _ in s:
                    pass
            assert s.finish_reason == "error"
        with pytest.raises(spyre_cb.EngineDeadError, match="takes no requests"):
            aeng.submit([1, 2], SamplingParams(max_tokens=2))

    try:
        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(main(), 60))
        assert time.monotonic() - t0 < 20
        assert aeng.dead is not None and "rank 1" in aeng.dead
        assert issubclass(spyre_cb.EngineDeadError, spyre_cb.ExecutorError)
        assert spyre_cb.errors.EngineDeadError is spyre_cb.EngineDeadError
    finally:
        aeng.shutdown()
