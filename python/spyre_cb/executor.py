"""Executors: what runs a step plan on the model, for the engine.

The engine talks to an executor, never to a model runner directly:
``execute(plan) -> logits`` (rank 0's view), ``vocab_size``, ``shutdown()``.

- :class:`LocalExecutor`: one process, one :class:`~spyre_cb.runner.ModelRunner`.
- :class:`TensorParallelExecutor`: ``tensor_parallel_size`` ranks over
  ``torch.distributed`` (gloo on CPU). The engine's process is rank 0: it owns
  the Rust scheduler, the sampler and the tokenizer and runs its own shard.
  Ranks 1..N-1 are worker processes it starts (``spawn``); each loads its shard
  with FMS's tensor-parallel strategy, keeps its own paged KV cache (its share
  of the KV heads) and runs every plan rank 0 broadcasts (a header and one
  int64 payload per step). Start-up waits for every rank's "ready" (or its traceback); a
  worker that dies, or a collective that times out, ends the executor with an
  :class:`~spyre_cb.errors.ExecutorError` and no orphan processes.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
import weakref
from datetime import timedelta
from typing import Any, Protocol

import torch

from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.cpus import ThreadGovernor, ThreadSetting, intra_op_threads
from spyre_cb.errors import ConfigError, ExecutorError
from spyre_cb.plan import ForwardPlan
from spyre_cb.runner import ModelRunner
from spyre_cb.wire import broadcast_plan, receive_plan


class Executor(Protocol):
    runner: ModelRunner  #: rank 0's runner

    @property
    def vocab_size(self) -> int: ...

    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One process, one model runner."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ConfigError(
                "a tensor-parallel engine is running in this process (torch.distributed is initialized): "
                "shut it down first, or give this engine the same tensor_parallel_size"
            )
        self._threads = ThreadSetting(intra_op_threads(config.num_threads))
        #: without a fixed num_threads, the threads follow what other processes leave free
        self._governor = ThreadGovernor() if config.num_threads is None else None
        self.runner = ModelRunner(checkpoint, config)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor:
        if self._governor is not None:
            self._governor.maybe_adjust()
        if all_positions:
            return self.runner.execute(plan, all_positions=True)
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        self._threads.restore()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _init_group(backend: str, rank: int, world: int, port: int, timeout_s: float) -> None:
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def _worker_main(rank: int, world: int, port: int, model: str, config: EngineConfig, ready: Any) -> None:
    """A tensor-parallel rank > 0: load the shard, then run every broadcast plan."""
    torch.set_num_threads(intra_op_threads(config.num_threads, world))
    try:
        _init_group(config.distributed_backend, rank, world, port, config.tp_timeout_s)
        runner = ModelRunner(Checkpoint.open(model, allow_unverified=True), config, tensor_parallel=True)
    except BaseException:
        ready.put(("error", rank, traceback.format_exc()))
        return
    ready.put(("ready", rank, ""))
    try:
        while True:
            plan, all_positions = receive_plan()
            if plan is None:
                break
            runner.execute(plan, all_positions=all_positions)
    except BaseException:  # rank 0 went away or a collective failed: nothing left to serve
        pass
    finally:
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _stop_processes(procs: list[Any], grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


class TensorParallelExecutor:
    """Rank 0 of ``tensor_parallel_size`` ranks; starts and owns ranks 1..N-1."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        import torch.multiprocessing as mp

        world = config.tensor_parallel_size
        if torch.distributed.is_initialized():
            raise ConfigError(
                "torch.distributed is already initialized in this process: one tensor-parallel engine at a time"
            )
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world, port, str(checkpoint.path), config, ready),
                name=f"spyre-cb-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, world)
        ]
        self._closed = False
        #: seconds spent broadcasting plans and in rank 0's forward, and steps run
        self.stats = {"broadcast_s": 0.0, "forward_s": 0.0, "steps": 0}
        self._finalizer = weakref.finalize(self, _stop_processes, self._procs, 0.0)
        for p in self._procs:
            p.start()
        # ranks share this machine's cores: each takes its share (this process
        # too, until shutdown)
        self._threads = ThreadSetting(intra_op_threads(config.num_threads, world))
        try:
            _init_group(config.distributed_backend, 0, world, port, config.tp_timeout_s)
            self.runner = ModelRunner(checkpoint, config, tensor_parallel=True)
            self._await_ready(ready, world - 1, config.tp_timeout_s)
        except BaseException:
            self._teardown()
            raise

    def _await_ready(self, ready: Any, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        got = 0
        while got < n:
            try:
                kind, rank, text = ready.get(timeout=0.2)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise ExecutorError(f"tensor-parallel worker {', '.join(dead)} exited during start-up") from None
                if time.monotonic() > deadline:
                    raise ExecutorError(f"tensor-parallel workers not ready after {timeout_s:g} s") from None
                continue
            if kind == "error":
                raise ExecutorError(f"tensor-parallel rank {rank} failed to start:\n{text}")
            got += 1

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def _check_alive(self) -> None:
        dead = [f"{p.name} (exit code {p.exitcode})" for p in self._procs if not p.is_alive()]
        if dead:
            self._teardown()
            raise ExecutorError(f"tensor-parallel worker {', '.join(dead)} died; the engine cannot run further steps")

    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor:
        if self._closed:
            raise ExecutorError(
                "the tensor-parallel executor was shut down (a worker failed, or shutdown() was called)"
            )
        self._check_alive()
        try:
            t0 = time.perf_counter()
            broadcast_plan(plan, all_positions)
            t1 = time.perf_counter()
            logits = self.runner.execute(plan, all_positions=all_positions)
            self.stats["broadcast_s"] += t1 - t0
            self.stats["forward_s"] += time.perf_counter() - t1
            self.stats["steps"] += 1
            return logits
        except BaseException as e:
            # a rank may now wait in a collective this rank left: the group is unusable
            self._teardown()
            if isinstance(e, Exception) and not isinstance(e, ExecutorError):
                raise ExecutorError(f"tensor-parallel step failed: {type(e).__name__}: {e}") from e
            raise

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        _stop_processes(self._procs, 0.0 if any(not p.is_alive() for p in self._procs) else 0.5)
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        self._threads.restore()
        self._finalizer.detach()

    def shutdown(self) -> None:
        """Stops the workers (they finish their loop) and leaves the process group."""
        if self._closed:
            return
        if all(p.is_alive() for p in self._procs):
            try:
                broadcast_plan(None)
            except Exception:  # noqa: BLE001 (a worker is gone: terminate below)
                pass
            _stop_processes(self._procs, 5.0)
        self._teardown()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]


def make_executor(checkpoint: Checkpoint, config: EngineConfig) -> LocalExecutor | TensorParallelExecutor:
    if config.tensor_parallel_size == 1:
        return LocalExecutor(checkpoint, config)
    return TensorParallelExecutor(checkpoint, config)


__all__ = ["Executor", "LocalExecutor", "TensorParallelExecutor", "make_executor"]
