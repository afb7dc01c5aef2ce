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

  The rendezvous is polled: rank 0 hosts the ``TCPStore`` (``wait_for_workers``
  off), each worker announces itself there before the process group is made,
  and rank 0 checks the workers' exit codes and error reports between short
  waits, so a worker that dies before joining (or a script whose spawned
  workers fail because it creates the engine without an
  ``if __name__ == "__main__":`` guard) is an ``ExecutorError`` at once; so
  is one that dies after joining, while the ranks connect (rank 0 connects in
  a helper thread and watches the workers meanwhile).
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
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
from spyre_cb.wire import broadcast_plan, open_plan_channel, receive_plan


class Executor(Protocol):
    runner: ModelRunner  #: rank 0's runner

    @property
    def vocab_size(self) -> int: ...

    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor: ...

    def shutdown(self) -> None: ...

    def failure(self) -> str | None:
        """Why no step can run any more (a worker died, a step failed), or None."""
        ...


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

    def failure(self) -> str | None:
        return None  # one process: a step's error is the step's, the engine serves the next


#: the exit code of a spawned worker whose start re-ran the engine's creation (no main guard)
EXIT_NO_MAIN_GUARD = 86
#: the store key each worker adds 1 to once connected to rank 0's store
_JOINED = "spyre_cb/joined"

MAIN_GUARD_HINT = (
    "the tensor-parallel workers are started with 'spawn', which re-imports the main script: "
    "create the engine under 'if __name__ == \"__main__\":' so that importing the script does not create it"
)


def _init_group(backend: str, rank: int, world: int, store: Any, timeout_s: float) -> None:
    torch.distributed.init_process_group(
        backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def _worker_main(rank: int, world: int, port: int, model: str, config: EngineConfig, ready: Any) -> None:
    """A tensor-parallel rank > 0: join rank 0's store, load the shard, then run every broadcast plan."""
    torch.set_num_threads(intra_op_threads(config.num_threads, world))
    try:
        timeout = timedelta(seconds=config.tp_timeout_s)
        store = torch.distributed.TCPStore("127.0.0.1", port, world, False, timeout)
        store.add(_JOINED, 1)
        _init_group(config.distributed_backend, rank, world, store, config.tp_timeout_s)
        open_plan_channel(timeout)
        runner = ModelRunner(Checkpoint.open(model, allow_unverified=True), config, tensor_parallel=True)
    except BaseException:
        ready.put(("error", rank, traceback.format_exc()))
        return
    ready.put(("ready", rank, ""))
    serve_plans(runner)


def serve_plans(runner: ModelRunner) -> bool:
    """A rank > 0's life after start-up: run every plan rank 0 broadcasts until it
    says stop (True) or a collective fails (False: rank 0 went away, a peer died);
    then leave the process group."""
    try:
        while True:
            plan, all_positions = receive_plan()
            if plan is None:
                return True
            runner.execute(plan, all_positions=all_positions)
    except BaseException:  # rank 0 went away or a collective failed: nothing left to serve
        return False
    finally:
        leave_group()


def leave_group() -> None:
    """Leaves this process's group, if any (a peer that is gone makes it fail: ignored)."""
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _stop_processes(procs: list[Any], grace_s: float = 5.0) -> None:
    procs = [p for p in procs if p.pid is not None]  # started ones only (join() asserts that)
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

        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # this is a spawned worker importing the main script, which creates an engine at import
            print(f"spyre_cb: a tensor-parallel worker cannot start: {MAIN_GUARD_HINT}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NO_MAIN_GUARD)
        world = config.tensor_parallel_size
        if torch.distributed.is_initialized():
            raise ConfigError(
                "torch.distributed is already initialized in this process: one tensor-parallel engine at a time"
            )
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        timeout = timedelta(seconds=config.tp_timeout_s)
        # rank 0 hosts the store without waiting for the workers in its constructor:
        # the rendezvous below polls them
        store = torch.distributed.TCPStore("127.0.0.1", 0, world, True, timeout, wait_for_workers=False)
        port = store.port
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
        #: why the executor stopped (a worker died, a step failed); None while it can run steps
        self._failure: str | None = None
        #: seconds spent broadcasting plans and in rank 0's forward, and steps run
        self.stats = {"broadcast_s": 0.0, "forward_s": 0.0, "steps": 0}
        # ranks share this machine's cores: each takes its share (this process
        # too, until shutdown)
        self._threads = ThreadSetting(intra_op_threads(config.num_threads, world))
        self._finalizer = weakref.finalize(self, _stop_processes, self._procs, 0.0)
        try:
            for p in self._procs:
                p.start()
            self._await_joined(store, ready, world - 1, config.tp_timeout_s)
            self._connect(config.distributed_backend, world, store, config.tp_timeout_s)
            self.runner = ModelRunner(checkpoint, config, tensor_parallel=True)
            self._await_ready(ready, world - 1, config.tp_timeout_s)
        except BaseException:
            self._teardown()
            raise

    def _dead_workers(self) -> list[str]:
        """'rank R (exit code C)' of every started worker that exited."""
        return [
            f"rank {rank} (pid {p.pid}, exit code {p.exitcode})"
            for rank, p in enumerate(self._procs, start=1)
            if p.pid is not None and not p.is_alive()
        ]

    def _start_up_error(self, phase: str) -> ExecutorError | None:
        """The ExecutorError for workers that exited during start-up, or None."""
        dead = self._dead_workers()
        if not dead:
            return None
        msg = f"tensor-parallel worker {', '.join(dead)} exited {phase}"
        if any(p.exitcode == EXIT_NO_MAIN_GUARD for p in self._procs):
            msg += f": {MAIN_GUARD_HINT}"
        return ExecutorError(msg)

    def _check_reports(self, ready: Any) -> None:
        """Raises the first start-up error a worker reported (a traceback); keeps "ready" ones."""
        while True:
            try:
                kind, rank, text = ready.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                raise ExecutorError(f"tensor-parallel rank {rank} failed to start:\n{text}")
            self._n_ready += 1

    def _await_joined(self, store: Any, ready: Any, n: int, timeout_s: float) -> None:
        """Waits until every worker has connected to the store, checking between short waits
        that none exited or reported an error (their start-up takes seconds: imports)."""
        self._n_ready = 0
        deadline = time.monotonic() + timeout_s
        while store.add(_JOINED, 0) < n:
            self._check_reports(ready)
            err = self._start_up_error("before the rendezvous")
            if err is not None:
                raise err
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"tensor-parallel rendezvous: {store.add(_JOINED, 0)} of {n} workers joined in {timeout_s:g} s "
                    "(tp_timeout_s)"
                )
            time.sleep(0.05)

    def _connect(self, backend: str, world: int, store: Any, timeout_s: float) -> None:
        """Rank 0's side of the process group and of the plan channel, made in a helper thread while this one
        watches the workers: one that dies after joining the store but before every
        rank is connected is an ExecutorError at once, not after ``timeout_s``. (The
        helper, blocked in the backend's connect, then ends with its own timeout.)"""
        failed: list[BaseException] = []

        def connect() -> None:
            try:
                _init_group(backend, 0, world, store, timeout_s)
                open_plan_channel(timedelta(seconds=timeout_s))  # (a collective too: watched the same way)
            except BaseException as e:  # noqa: BLE001 (re-raised below, on the caller's thread)
                failed.append(e)

        t = threading.Thread(target=connect, name="spyre-cb-tp-connect", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            err = self._start_up_error("while the ranks connected")
            if err is not None and t.is_alive():
                raise err
        if failed:
            raise failed[0]

    def _await_ready(self, ready: Any, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._n_ready < n:
            try:
                kind, rank, text = ready.get(timeout=0.2)
            except queue.Empty:
                err = self._start_up_error("during start-up")
                if err is not None:
                    raise err from None
                if time.monotonic() > deadline:
                    raise ExecutorError(f"tensor-parallel workers not ready after {timeout_s:g} s") from None
                continue
            if kind == "error":
                raise ExecutorError(f"tensor-parallel rank {rank} failed to start:\n{text}")
            self._n_ready += 1

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def _check_alive(self) -> None:
        why = self.failure()
        if why is not None:
            raise ExecutorError(why)

    def failure(self) -> str | None:
        """Why no step can run any more, or None; a worker found dead tears the executor down."""
        if self._failure is None and not self._closed:
            dead = self._dead_workers()
            if dead:
                self._failure = f"tensor-parallel worker {', '.join(dead)} died; the engine cannot run further steps"
                self._teardown()
        return self._failure

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
            # which worker died, if one did (a failed collective is usually a dead peer, whose
            # exit the OS reports a moment later): asked before the teardown stops the others
            dead = self._dead_workers()
            deadline = time.monotonic() + 1.0
            while not dead and isinstance(e, Exception) and time.monotonic() < deadline:
                time.sleep(0.02)
                dead = self._dead_workers()
            self._teardown()
            self._failure = f"tensor-parallel step failed: {type(e).__name__}: {first_line(str(e))}"
            if dead:
                self._failure = f"tensor-parallel worker {', '.join(dead)} died; {self._failure}"
            if isinstance(e, Exception) and not isinstance(e, ExecutorError):
                raise ExecutorError(self._failure) from e
            raise

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        _stop_processes(self._procs, 0.0 if any(not p.is_alive() for p in self._procs) else 0.5)
        leave_group()
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


def first_line(text: str, limit: int = 300) -> str:
    """An error's first line, at most ``limit`` characters (for a one-line reason)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def make_executor(checkpoint: Checkpoint, config: EngineConfig) -> Executor:
    """This process's executor: rank 0 of the ranks a launcher started (torchrun: see
    :mod:`spyre_cb.launched`), of ranks it starts itself, or one process."""
    from spyre_cb.launched import LaunchedExecutor, launched_rank

    if launched_rank() is not None:
        return LaunchedExecutor(checkpoint, config)
    if config.tensor_parallel_size == 1:
        return LocalExecutor(checkpoint, config)
    return TensorParallelExecutor(checkpoint, config)


__all__ = ["Executor", "LocalExecutor", "TensorParallelExecutor", "make_executor"]
