"""Data-parallel serving (issue 24): N engine replicas behind one server.

- ``spyre-cb serve tiny --data-parallel-size 2`` (a subprocess on a free
  loopback port) driven by the real ``openai`` client: greedy tokens equal one
  engine's, requests spread by the rule, metrics labelled per replica, a killed
  replica's streams end with an error while the other's finish, ``/health``
  says degraded, and the replica is restarted;
- the same rule in the core's simulation: the replicas' routing and every
  request's first-token and finish steps equal ``simulate_fleet`` /
  ``simulate_stats`` on the same workload (``DataParallelEngine`` in process).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import pytest

import spyre_cb
from spyre_cb import SamplingParams, _core
from spyre_cb.data_parallel import DataParallelEngine, cpu_shares

openai = pytest.importorskip("openai")

from test_server import Server, _get  # noqa: E402


def test_cpu_shares_split_the_cpus_into_contiguous_groups():
    assert cpu_shares(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert cpu_shares(3, [4, 5, 6]) == [[4], [5], [6]]
    assert cpu_shares(3, [0, 1]) == [[0], [1], [0]]  # fewer CPUs than replicas: they share
    assert sorted(c for share in cpu_shares(2) for c in share) == sorted(os.sched_getaffinity(0))


def test_the_router_refuses_bad_rules_and_loads():
    with pytest.raises(spyre_cb.ConfigError, match="router must be one of"):
        _core.Router("fastest", 2)
    with pytest.raises(spyre_cb.ConfigError, match="one load per replica"):
        _core.Router("least-loaded", 2).route([0], [1, 2])
    with pytest.raises(spyre_cb.ConfigError, match="prefix-affinity .* needs --policy chunked --prefix-caching"):
        DataParallelEngine(spyre_cb.EngineConfig(), 2, router="prefix-affinity")


def test_data_parallelism_under_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(spyre_cb.ConfigError, match="under a launcher"):
        DataParallelEngine(spyre_cb.EngineConfig(), 2)


def test_a_request_a_replica_cannot_take_is_refused_alone(tmp_path_factory):
    """Refusals (the replica's own checks, parameters that cannot travel) are the
    request's error; nothing stays counted, and the replicas serve on."""
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("dprefuse")))
    with DataParallelEngine(spyre_cb.EngineConfig(max_num_seqs=2, max_model_len=256), 2) as dp:

        async def run() -> list[int]:
            with pytest.raises(spyre_cb.InvalidRequestError, match="max_model_len 256"):
                await dp.submit_all([([5] * 300, SamplingParams(max_tokens=4), "long")])
            unpicklable = SamplingParams(max_tokens=4, logits_processors=[lambda ids, logits: logits])
            with pytest.raises(spyre_cb.InvalidRequestError, match="picklable"):
                await dp.submit_all([([5, 6], SamplingParams(max_tokens=4), "a"), ([5, 6], unpicklable, "b")])
            (s,) = await dp.submit_all([([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "c")])
            return [t async for o in s for t in o.new_token_ids]

        assert len(asyncio.run(asyncio.wait_for(run(), 60))) == 4
        assert [(r.state, r.outstanding) for r in dp.status()] == [("up", 0), ("up", 0)]


# ----- the server ----------------------------------------------------------------------


def _health(server: Server) -> dict:
    status, text = _get(server.base + "/health")
    assert status == 200, text
    return json.loads(text)


def _metric(server: Server, name: str, replica: int) -> float:
    _, text = _get(server.base + "/metrics")
    m = re.search(rf'^{re.escape(name)}{{replica="{replica}"}} ([0-9.e+-]+)$', text, re.M)
    assert m, f"{name}{{replica={replica}}} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("dp"),
        "--data-parallel-size",
        "2",
        "--max-replica-restarts",
        "2",
        "--max-model-len",
        "2048",
    )
    yield s
    s.stop()


PROMPTS = ["Hello there, how are", "The quick brown fox", "def add(a, b):", "Once upon a time", "1, 2, 3,"]


def test_replicas_answer_what_one_engine_answers_and_share_the_requests(dp_server, tmp_path_factory):
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("dpref")))
    llm = spyre_cb.LLM("tiny", max_num_seqs=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    before = [r["requests"] for r in _health(dp_server)["replicas"]]

    async def run() -> list[str]:
        async with dp_server.async_client() as c:
            rs = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        c.completions.create(
                            model="tiny", prompt=p, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True}
                        )
                        for p in PROMPTS
                    )
                ),
                60,
            )
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run()) == want
    health = _health(dp_server)
    assert health["status"] == "ok"
    got = [r["requests"] - b for r, b in zip(health["replicas"], before)]
    assert sum(got) == len(PROMPTS) and min(got) >= 1, got  # both replicas served
    # the metrics say which replica did what
    tokens = [_metric(dp_server, "spyre_cb_generation_tokens_total", i) for i in (0, 1)]
    assert all(t > 0 for t in tokens) and sum(tokens) >= 12 * len(PROMPTS)
    assert _metric(dp_server, "spyre_cb_replica_up", 0) == 1 and _metric(dp_server, "spyre_cb_replica_up", 1) == 1
    # every replica got its own share of the CPUs
    shares = [r["cpus"] for r in health["replicas"]]
    assert shares == cpu_shares(2)


def test_a_killed_replica_fails_its_requests_the_other_serves_and_it_restarts(dp_server):
    replicas = _health(dp_server)["replicas"]
    victim = replicas[1]["pid"]

    async def run() -> list[tuple[str, int]]:
        async with dp_server.async_client() as c:
            started = asyncio.Event()
            seen = [0] * 4

            async def one(i: int) -> tuple[str, int]:
                n = 0
                try:
                    s = await c.completions.create(
                        model="tiny",
                        prompt=PROMPTS[i],
                        max_tokens=2000,
                        temperature=0.0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    async for chunk in s:
                        n += len(chunk.choices[0].text) > 0 if chunk.choices else 0
                        seen[i] = n
                        if all(seen):
                            started.set()
                    return ("done", n)
                except openai.APIError as e:
                    return (f"error: {e}", n)

            tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
            await asyncio.wait_for(started.wait(), 60)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(run())
    errors = [r for r, _ in results if r != "done"]
    # least-loaded over 4 streams: two on each replica; the killed one's two end with an error
    assert len(errors) == 2, results
    assert all("replica 1 died" in e for e in errors), errors
    assert sum(1 for r, n in results if r == "done" and n > 100) == 2, results
    # routed no more while down, then restarted: /health degraded, then ok again
    deadline = time.monotonic() + 120
    states = []
    while time.monotonic() < deadline:
        h = _health(dp_server)
        states.append(h["status"])
        if h["status"] == "ok" and h["replicas"][1]["restarts"] == 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"replica 1 was not restarted: {_health(dp_server)}")
    assert h["replicas"][1]["pid"] != victim and h["replicas"][0]["restarts"] == 0
    assert _metric(dp_server, "spyre_cb_replica_restarts_total", 1) == 1
    # the restarted replica serves
    with dp_server.client() as c:  # (closed: no keep-alive connection holds up the server's shutdown)
        r = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=4, temperature=0.0)
    assert len(r.choices) == 2
    assert _health(dp_server)["replicas"][1]["requests"] > replicas[1]["requests"]


def test_a_replica_that_cannot_start_stops_the_server_with_its_reason(tmp_path):
    with pytest.raises(RuntimeError, match="server exited"):
        # max_model_len beyond the checkpoint's positions: every replica refuses to start
        Server(tmp_path, "--data-parallel-size", "2", "--max-model-len", "1000000")


# ----- against the simulation -------------------------------------------------------------


def _workload(n: int) -> list[tuple[list[int], int]]:
    import random

    rng = random.Random(7)
    return [([rng.randrange(5, 200) for _ in range(rng.randrange(3, 150))], rng.randrange(4, 60)) for _ in range(n)]


@pytest.mark.parametrize("rule", ["round-robin", "least-loaded"])
def test_the_replicas_run_the_steps_the_simulation_predicts(tmp_path_factory, rule):
    """Same workload, same rule: the requests go where ``simulate_fleet`` sends them
    (all arriving at once, so its loads are the server's), and each replica's every
    request has its first token and finishes at the step ``simulate_stats`` says,
    from the steps it arrived at on that replica (waves sent while others run)."""
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("dpsim")))
    config = spyre_cb.EngineConfig(max_num_seqs=4, max_model_len=512)
    work = _workload(24)
    with DataParallelEngine(config, 2, router=rule) as dp:

        async def run() -> None:
            first = [(ids, SamplingParams(max_tokens=m, ignore_eos=True), f"a{i}") for i, (ids, m) in enumerate(work)]
            streams = await dp.submit_all(first[:12])
            await asyncio.sleep(0.05)  # a second wave while the first runs
            streams += await dp.submit_all(first[12:])
            for s in streams:
                async for _ in s:
                    pass

        asyncio.run(asyncio.wait_for(run(), 120))
        routes = list(dp.routes)
        status = dp.status()
    # the first wave's routing, as the simulation routes 12 requests arriving together
    fleet = _core.simulate_fleet([(0, len(ids), m) for ids, m in work[:12]], config.scheduler, replicas=2, router=rule)
    assert [r.replica for r in routes[:12]] == fleet["assignment"]
    for k in (0, 1):
        mine = [r for r in routes if r.replica == k]
        assert len(mine) == status[k].requests
        sim = _core.simulate_stats([(r.arrival_step, r.prompt_len, r.max_tokens) for r in mine], config.scheduler)
        assert sim["first_token"] == [r.first_token_step for r in mine], k
        assert sim["finished"] == [r.finished_step for r in mine], k
        counters = sim["counters"]
        assert counters["prefill_steps"] + counters["decode_steps"] == status[k].busy_steps
    # the second wave really arrived while the first ran (else this is the first check again)
    assert any(r.arrival_step > 0 for r in routes[12:])


def test_prefix_affinity_takes_more_prompts_from_the_cache(tmp_path_factory):
    """Shared system prompts (12 of 5 blocks: more than one replica's pool keeps,
    not more than two): prefix affinity sends each to where it is cached."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
    from data_parallel import prefix_hits  # the benchmark's workload and counting

    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("dpprefix")))
    from spyre_cb.models import tiny_model_path

    got = prefix_hits(str(tiny_model_path()), 48, ("round-robin", "prefix-affinity"))
    rr, aff = got["round-robin"], got["prefix-affinity"]
    assert rr["hit_blocks"] > 0, got
    assert aff["hit_blocks"] > rr["hit_blocks"], got
    assert sum(aff["requests_per_replica"]) == 48 and min(aff["requests_per_replica"]) > 0, got


def test_replicas_of_two_tensor_parallel_ranks_each(tmp_path_factory):
    """``--data-parallel-size 2 --tensor-parallel-size 2``: each replica starts its own
    ranks (its children); tokens equal one engine's, and nothing is left after."""
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("dptp")))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    llm = spyre_cb.LLM("tiny", max_num_seqs=4, num_threads=1)
    try:
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": x} for x in prompts], p)]
    finally:
        llm.engine.shutdown()  # (gives the process its threads back)
    config = spyre_cb.EngineConfig(max_num_seqs=4, tensor_parallel_size=2, num_threads=1)
    with DataParallelEngine(config, 2) as dp:

        async def run() -> list[list[int]]:
            streams = await dp.submit_all([(x, p, f"t{i}") for i, x in enumerate(prompts)])
            return [[t async for o in s for t in o.new_token_ids] for s in streams]

        assert asyncio.run(asyncio.wait_for(run(), 120)) == want
        pids = [r.pid for r in dp.status()]
        assert all(r.requests == 2 for r in dp.status())
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
