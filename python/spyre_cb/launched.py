"""Tensor-parallel ranks started by an external launcher, on one host or several.

torch's elastic launcher starts every rank (on every host) with the same
command, e.g. on each of two hosts::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank K \\
             --master-addr HOST0 --master-port 29500 --max-restarts 0 \\
             -m spyre_cb serve MODEL --tensor-parallel-size 2

and tells each who it is (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; ``TORCHELASTIC_RUN_ID`` says torchrun started it). Rank 0
runs the scheduler and the server with a :class:`LaunchedExecutor`; every
other rank, on reaching the same entry point, runs :func:`run_worker`
instead: it loads its shard and runs the plans rank 0 broadcasts (the same
wire as ranks spyre_cb starts itself) until rank 0 stops.

Why torchrun (not Ray): it ships with torch, which every rank already has;
its rendezvous and its store are what ``torch.distributed`` uses anyway; an
agent per host supervises its ranks, so a lost rank ends that host's agent
and, through rank 0's failure, the others — nothing is left running. Ray
would add a cluster runtime for what one launcher line does.

Liveness: each worker adds to its heartbeat counter in the launcher's store
every ``HEARTBEAT_S``; rank 0 reads them (at most every ``HEARTBEAT_S``, when
the engine asks ``failure()``, idle or before a step) and declares a rank
lost when its counter has not moved for ``HEARTBEAT_TIMEOUT_S``. A rank that
dies during a step breaks the step's collective at once (its connections
close). Either way the engine gets an :class:`~spyre_cb.errors.ExecutorError`
naming the rank; a server run by a launcher then exits with status 1, so the
launcher sees it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch

from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.cpus import ThreadSetting, intra_op_threads
from spyre_cb.errors import ConfigError, ExecutorError
from spyre_cb.executor import first_line, leave_group, serve_plans
from spyre_cb.plan import ForwardPlan
from spyre_cb.runner import ModelRunner
from spyre_cb.wire import broadcast_plan, open_plan_channel

#: seconds between a worker's heartbeats, and without one before rank 0 declares it lost
HEARTBEAT_S = 0.25
HEARTBEAT_TIMEOUT_S = 3.0


def _beat_key(rank: int) -> str:
    """A rank's heartbeat counter, per launcher attempt (the store outlives a restart)."""
    return f"spyre_cb/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/beat/{rank}"


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process as one of several ranks, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return (rank, world) if world > 1 else None


def _check(config: EngineConfig, world: int) -> None:
    if config.tensor_parallel_size != world:
        raise ConfigError(
            f"the launcher started {world} ranks (WORLD_SIZE) but tensor_parallel_size is "
            f"{config.tensor_parallel_size}: give --tensor-parallel-size {world}"
        )


def _store(timeout_s: float) -> Any:
    """A client of the launcher's store (``MASTER_ADDR:MASTER_PORT``)."""
    return torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s)
    )


def _join(config: EngineConfig, rank: int, world: int) -> None:
    if torch.distributed.is_initialized():
        raise ConfigError("torch.distributed is already initialized in this process: one engine per launched rank")
    torch.distributed.init_process_group(
        config.distributed_backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=config.tp_timeout_s),
    )
    open_plan_channel(timedelta(seconds=config.tp_timeout_s))


class LaunchedExecutor:
    """Rank 0 of ranks a launcher started: runs its shard, broadcasts each plan."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        got = launched_rank()
        assert got is not None, "LaunchedExecutor runs in a rank a launcher started"
        rank, world = got
        if rank != 0:
            raise ConfigError(f"only rank 0 runs the engine; rank {rank} runs spyre_cb.launched.run_worker")
        _check(config, world)
        self.world = world
        self._closed = False
        self._failure: str | None = None
        self._threads = ThreadSetting(intra_op_threads(config.num_threads))
        try:
            _join(config, 0, world)
            self.runner = ModelRunner(checkpoint, config, tensor_parallel=True)
            self._store = _store(config.tp_timeout_s)
        except BaseException:
            self._teardown()
            raise
        #: per worker rank: (last counter seen, when it last moved); a rank that has not
        #: beaten yet (still loading its shard) has tp_timeout_s
        self._beats = {r: (0, time.monotonic() + config.tp_timeout_s - HEARTBEAT_TIMEOUT_S) for r in range(1, world)}
        self._checked = 0.0
        # a program that ends without shutting the engine down still stops the other
        # ranks cleanly (else they fail, and so does the launcher's job)
        atexit.register(self.shutdown)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def failure(self) -> str | None:
        """Why no step can run any more (a rank stopped beating), or None."""
        if self._failure is not None or self._closed:
            return self._failure
        now = time.monotonic()
        if now - self._checked < HEARTBEAT_S:
            return None
        self._checked = now
        for r, (seen, moved) in self._beats.items():
            try:
                count = int(self._store.add(_beat_key(r), 0))
            except Exception as e:  # noqa: BLE001 (the launcher's store is gone: so is the job)
                return self._fail(f"the launcher's store is unreachable: {type(e).__name__}: {e}")
            if count != seen:
                self._beats[r] = (count, now)
            elif now - moved > HEARTBEAT_TIMEOUT_S:
                return self._fail(
                    f"tensor-parallel rank {r} (started by the launcher) sent no heartbeat for "
                    f"{now - moved:.1f} s: it is lost; the engine cannot run further steps"
                )
        return None

    def _fail(self, why: str) -> str:
        self._failure = why
        self._teardown()
        return why

    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor:
        if self._closed:
            raise ExecutorError(self._failure or "the launched tensor-parallel executor was shut down")
        why = self.failure()
        if why is not None:
            raise ExecutorError(why)
        try:
            broadcast_plan(plan, all_positions)
            return self.runner.execute(plan, all_positions=all_positions)
        except BaseException as e:
            # a peer that died breaks the collective: say which one, if its heartbeat says so
            time.sleep(HEARTBEAT_S)
            lost = self._silent_ranks()
            why = f"tensor-parallel step failed: {type(e).__name__}: {first_line(str(e))}"
            if lost:
                why = f"tensor-parallel rank {', '.join(map(str, lost))} (started by the launcher) is lost; {why}"
            self._fail(why)
            if isinstance(e, Exception) and not isinstance(e, ExecutorError):
                raise ExecutorError(why) from e
            raise

    def _silent_ranks(self) -> list[int]:
        """The worker ranks whose heartbeat does not move over two beats (all of them
        when the launcher's store cannot be read)."""
        try:
            before = {r: int(self._store.add(_beat_key(r), 0)) for r in self._beats}
            time.sleep(2 * HEARTBEAT_S)
            return [r for r in self._beats if int(self._store.add(_beat_key(r), 0)) == before[r]]
        except Exception:  # noqa: BLE001
            return list(self._beats)

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        leave_group()
        self._threads.restore()

    def shutdown(self) -> None:
        """Tells the other ranks to stop (they exit), then leaves the process group."""
        if self._closed:
            return
        try:
            broadcast_plan(None)
        except Exception:  # noqa: BLE001 (a rank is gone: the launcher ends the rest)
            pass
        self._teardown()


def run_worker(config: EngineConfig) -> int:
    """A launched rank > 0: join the group, load the shard, beat, run rank 0's plans.
    Returns the process's exit status: 0 when rank 0 stopped it, 1 when the group failed."""
    got = launched_rank()
    assert got is not None and got[0] != 0, "run_worker runs in a rank > 0 a launcher started"
    rank, world = got
    _check(config, world)
    torch.set_num_threads(intra_op_threads(config.num_threads))
    config = config.with_model_path()
    _join(config, rank, world)
    runner = ModelRunner(Checkpoint.open(config.model, allow_unverified=True), config, tensor_parallel=True)
    store = _store(config.tp_timeout_s)
    stop = threading.Event()

    def beat() -> None:
        key = _beat_key(rank)
        while not stop.wait(HEARTBEAT_S):
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 (the store is gone: the job is ending)
                return

    t = threading.Thread(target=beat, name="spyre-cb-heartbeat", daemon=True)
    t.start()
    try:
        return 0 if serve_plans(runner) else 1
    finally:
        stop.set()


__all__ = ["HEARTBEAT_S", "HEARTBEAT_TIMEOUT_S", "LaunchedExecutor", "launched_rank", "run_worker"]
