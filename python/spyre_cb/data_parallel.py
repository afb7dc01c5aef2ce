"""Data-parallel serving: ``N`` engine replicas behind one front.

Each replica is its own process (spawned; its tensor-parallel ranks, if any,
are its children) with its own share of this process's CPUs (an affinity
mask: the CPUs split into ``N`` contiguous groups), its own model and its own
KV cache; it runs an :class:`~spyre_cb.async_engine.AsyncEngine` and talks to
the front over one pipe:

- front → replica: ``("add", seq, id, prompt ids, params)``, ``("abort", id)``, ``("stop",)``;
- replica → front: ``("ready", vocab_size)``, ``("added", seq, error, arrival step)``,
  after every step ``("step", outputs, their RequestMetrics, StepReport, steps, busy steps)``,
  and ``("dead", reason)`` when its engine died (it then exits).

The front (:class:`DataParallelEngine`, what the server's handlers use in place
of an ``AsyncEngine``) routes each request by the core's
:class:`~spyre_cb._core.Router` — the rule ``simulate_fleet`` uses — over the
replicas' outstanding sequences (requests routed there and not finished,
counting a beam search as its width; counted by the front itself, so never
stale), and, with ``prefix-affinity``, its estimate of each replica's prefix
cache. A replica that dies (its process exits, its engine dies) ends its
requests in flight with :class:`~spyre_cb.errors.EngineDeadError` naming it,
is routed no more, and is restarted after a back-off, at most
``max_restarts`` times; the others serve on. The front is dead only when no
replica is up and none will be restarted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spyre_cb import _core
from spyre_cb import errors as _errors
from spyre_cb.async_engine import Job, RequestStream, _hand_over, _Item
from spyre_cb.beam_search import BeamSearchParams
from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.errors import ConfigError, EngineDeadError, ExecutorError, InvalidRequestError, SpyreCBError
from spyre_cb.outputs import RequestMetrics
from spyre_cb.structured import GrammarCompiler, StructuredOutputsParams

log = logging.getLogger("spyre_cb.data_parallel")
_pickler = multiprocessing.reduction.ForkingPickler

#: the routing rules (the core's)
ROUTERS = ("least-loaded", "round-robin", "prefix-affinity")
#: seconds a replica may take to load its model and answer "ready"
START_TIMEOUT_S = 600.0
#: seconds the front waits for a replica to accept or refuse a request
REPLY_TIMEOUT_S = 60.0
#: routing records kept for inspection (the newest)
ROUTE_LOG = 10_000


def cpu_shares(n: int, cpus: Sequence[int] | None = None) -> list[list[int]]:
    """This process's CPUs (its affinity mask) split into ``n`` contiguous groups,
    as even as they go; with fewer CPUs than replicas, replicas share them."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
    cpus = list(cpus)
    if len(cpus) < n:
        return [[cpus[i % len(cpus)]] for i in range(n)]
    q, r = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = q + (1 if i < r else 0)
        out.append(cpus[start : start + size])
        start += size
    return out


# ----- the replica process ------------------------------------------------------------


def _replica_main(conn: Any, config: EngineConfig, index: int, cpus: list[int]) -> None:
    """A replica: its engine, stepped by an AsyncEngine, fed and read through ``conn``."""
    from spyre_cb.async_engine import AsyncEngine
    from spyre_cb.engine import Engine
    from spyre_cb.server.metrics import StepReporter

    # the server's Ctrl-C or its service manager's SIGTERM reach the whole process group:
    # the server stops its replicas itself ("stop", or its end of the pipe closing)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass
    try:
        engine = Engine(config=config)
    except BaseException as e:  # a bad checkpoint, a TP start that failed: the front says why
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            try:
                conn.send(msg)
            except (OSError, EOFError):  # the front is gone: the loop below ends
                pass

    reporter = StepReporter()
    busy = [0]

    def on_step(e: Any, outs: list[Any]) -> None:
        if e.last_plan_kind not in (None, "idle"):
            busy[0] += 1
        metrics = {o.request_id: e.requests[o.request_id].metrics for o in outs if o.request_id in e.requests}
        send(("step", outs, metrics, reporter.report(e, outs), e.n_scheduled, busy[0]))

    died = threading.Event()

    def on_death(reason: str) -> None:
        send(("dead", reason))
        died.set()

    front = AsyncEngine(engine)
    front.on_step.append(on_step)
    front.on_death.append(on_death)
    send(("ready", engine.vocab_size))
    try:
        while not died.is_set():
            if not conn.poll(0.2):
                continue
            msg = conn.recv()
            if msg[0] == "add":
                _, seq, rid, ids, params = msg
                try:
                    state = front.add(ids, params, rid)
                except SpyreCBError as e:
                    send(("added", seq, (type(e).__name__, str(e)), -1))
                except Exception as e:  # noqa: BLE001 (this request only: the replica serves on)
                    send(("added", seq, ("InvalidRequestError", f"{type(e).__name__}: {e}"), -1))
                else:
                    send(("added", seq, None, state.arrival_step))
            elif msg[0] == "abort":
                front.abort(msg[1])
            elif msg[0] == "stop":
                break
    except (EOFError, OSError):  # the front is gone
        pass
    finally:
        front.shutdown()


# ----- the front ----------------------------------------------------------------------


@dataclass
class Route:
    """Where one request went, and when in its replica's steps (the engine's
    ``n_scheduled``: a request that arrives at step k can first run in step k + 1,
    the simulation's convention): it arrived, had its first token, finished."""

    request_id: str
    replica: int
    prompt_len: int
    max_tokens: int | None
    arrival_step: int = -1
    first_token_step: int = -1
    finished_step: int = -1


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]
    metrics: RequestMetrics
    replica: int
    weight: int  #: sequences it counts for in its replica's load
    route: Route


@dataclass
class ReplicaStatus:
    """How one replica fares (``state``: starting, up, restarting, failed)."""

    index: int
    state: str
    pid: int | None
    cpus: list[int]
    restarts: int
    requests: int  #: routed to it since the server started
    outstanding: int  #: sequences routed there and not finished
    steps: int  #: steps its current process scheduled
    busy_steps: int  #: of them, steps that ran a prefill, chunk or decode
    last_error: str | None = None


@dataclass
class _Replica:
    index: int
    cpus: list[int]
    state: str = "starting"
    proc: Any = None
    conn: Any = None
    restarts: int = 0
    requests: int = 0
    outstanding: int = 0
    steps: int = 0
    busy_steps: int = 0
    waiting: int = 0  #: its queue after its last step
    unreported: int = 0  #: requests sent since its last step's report
    last_error: str | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg: tuple[Any, ...]) -> bool:
        """Sends ``msg``; False when the replica is gone. (A message that does not
        pickle raises: nothing was written.)"""
        data = _pickler.dumps(msg)
        with self.send_lock:
            if self.conn is None:
                return False
            try:
                self.conn.send_bytes(data)
                return True
            except (OSError, EOFError):
                return False


class DataParallelEngine:
    """``size`` replicas of ``config``'s engine behind one routing rule (see the module)."""

    def __init__(
        self,
        config: EngineConfig,
        size: int,
        *,
        router: str = "least-loaded",
        max_restarts: int = 3,
        restart_backoff_s: float = 1.0,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"data_parallel_size must be an int >= 1, got {size!r}")
        if router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
        from spyre_cb.launched import launched_rank

        if launched_rank() is not None:
            raise ConfigError(
                "data parallelism under a launcher (torchrun) is not supported: the launcher's ranks form one "
                "tensor-parallel engine; run --data-parallel-size without torchrun"
            )
        if router == "prefix-affinity" and not (config.policy == "chunked" and config.prefix_caching):
            raise ConfigError(
                "router prefix-affinity routes by cached prompt prefixes: it needs --policy chunked --prefix-caching"
            )
        self._config = config = config.with_model_path()
        ckpt = Checkpoint.open(config.model, allow_unverified=config.allow_unverified_architectures)
        self._tokenizer = ckpt.load_tokenizer()
        self._eos = ckpt.eos_token_ids(self._tokenizer)
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        self.router = _core.Router(router, size, config.scheduler.available_blocks)
        self.replicas = [_Replica(i, c) for i, c in enumerate(cpu_shares(size))]
        #: step hooks: (replica index, its StepReport) on a replica's reader thread
        self.on_report: list[Callable[[int, Any], None]] = []
        #: called with a replica's index and what happened to it: "up", "down", "restarted"
        self.on_replica: list[Callable[[int, str], None]] = []
        #: why no request can be served any more (None while a replica serves or will)
        self.dead: str | None = None
        #: where the newest requests went
        self.routes: collections.deque[Route] = collections.deque(maxlen=ROUTE_LOG)
        self._vocab_size = 0
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._pending: dict[int, tuple[int, asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._stopping = False
        self._ctx = multiprocessing.get_context("spawn")
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        try:
            # every replica loads at once; a replica that cannot start stops the server's start
            starters = [threading.Thread(target=self._start, args=(r,), daemon=True) for r in self.replicas]
            for t in starters:
                t.start()
            for t in starters:
                while t.is_alive():  # (joined in slices: Ctrl-C reaches this thread)
                    t.join(0.2)
            failed = [r for r in self.replicas if r.state != "up"]
            if failed:
                r = failed[0]
                raise ExecutorError(f"data-parallel replica {r.index} did not start: {r.last_error}")
        except BaseException:
            self.shutdown()
            raise
        self._readers = [
            threading.Thread(target=self._serve, args=(r,), name=f"spyre-cb-dp-replica{r.index}", daemon=True)
            for r in self.replicas
        ]
        for t in self._readers:
            t.start()

    # ----- replica lifecycle (each replica's reader thread) ---------------------------

    def _start(self, r: _Replica) -> None:
        """Starts ``r``'s process and waits for its "ready" (state up, or failed with why)."""
        front, back = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_replica_main,
            args=(back, self._config, r.index, r.cpus),
            name=f"spyre-cb-dp-replica{r.index}",
            daemon=False,  # its tensor-parallel ranks are its children (a daemon may have none)
        )
        proc.start()
        back.close()
        if r.conn is not None:
            r.conn.close()
        r.proc, r.conn, r.steps, r.busy_steps, r.waiting, r.unreported = proc, front, 0, 0, 0, 0
        error = "start timed out"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if not front.poll(0.1):
                    if not proc.is_alive() or self._stopping:
                        error = "stopped" if self._stopping else f"its process exited with code {proc.exitcode}"
                        break
                    continue
                msg = front.recv()
            except (EOFError, OSError):  # it died, or shutdown() closed the pipe
                proc.join(1.0)
                error = f"its process exited with code {proc.exitcode}"
                break
            if msg[0] == "ready":
                self._vocab_size = msg[1]
                with self._lock:
                    r.state, r.last_error = "up", None
                self._changed(r, "up")
                return
            error = msg[1]  # ("failed", why)
            break
        _stop(proc)
        r.state, r.last_error = "failed", error

    def _serve(self, r: _Replica) -> None:
        """Reads ``r``'s messages; when it dies, fails its requests and restarts it."""
        while not self._stopping:
            reason = None
            try:
                msg = r.conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                r.proc.join(1.0)
                reason = f"its process exited (code {r.proc.exitcode})"
            except Exception:  # a message that does not unpickle: the replica is broken
                log.exception("data-parallel replica %d sent a message that cannot be read", r.index)
                reason = "it sent a message that cannot be read"
            else:
                try:
                    if msg[0] == "step":
                        self._on_step(r, *msg[1:])
                    elif msg[0] == "added":
                        self._on_added(r, *msg[1:])
                    elif msg[0] == "dead":  # its engine died: it is stopping; route no more there now
                        reason = f"its engine died: {msg[1]}"
                except Exception:
                    log.exception("data-parallel replica %d: a message failed", r.index)
            if reason is not None:
                self._lost(r, reason)
                if not self._restart(r):
                    return

    def _on_step(
        self, r: _Replica, outs: list[Any], metrics: dict[str, Any], report: Any, steps: int, busy: int
    ) -> None:
        r.steps, r.busy_steps, r.waiting, r.unreported = steps, busy, report.waiting, 0
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._lock:
            for o in outs:
                req = self._requests.get(o.request_id)
                if req is None or req.replica != r.index:  # (an id reused after an abort elsewhere)
                    continue
                m = metrics.get(o.request_id)
                if m is not None:
                    req.metrics.__dict__.update(m.__dict__)
                if req.route.first_token_step < 0 and (o.new_token_ids or o.beams):
                    req.route.first_token_step = steps
                if o.finished:
                    req.route.finished_step = steps
                    del self._requests[o.request_id]
                    r.outstanding -= req.weight
                batches.setdefault(req.loop, []).append((req.queue, o))
        _hand_over(batches)
        for hook in self.on_report:
            try:
                hook(r.index, report)
            except Exception:
                log.exception("a report hook failed")

    def _on_added(self, r: _Replica, seq: int, error: tuple[str, str] | None, arrival_step: int) -> None:
        with self._lock:
            entry = self._pending.pop(seq, None)
        if entry is None:
            return
        _, loop, fut = entry
        _resolve(loop, fut, (error, arrival_step))

    def _lost(self, r: _Replica, reason: str) -> None:
        """``r`` died: it is routed no more; its requests end with EngineDeadError."""
        log.error("data-parallel replica %d died: %s", r.index, reason)
        with self._lock:
            r.state, r.last_error = "restarting", reason
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._lock:
            for rid, req in list(self._requests.items()):
                if req.replica == r.index:
                    del self._requests[rid]
                    err = EngineDeadError(f"request {rid!r} ended: data-parallel replica {r.index} died: {reason}")
                    batches.setdefault(req.loop, []).append((req.queue, err))
            pending = [(s, e) for s, e in self._pending.items() if e[0] == r.index]
            for s, _ in pending:
                del self._pending[s]
            r.outstanding = r.waiting = r.unreported = 0
            self.router.forget(r.index)
        _hand_over(batches)
        for _, (_, loop, fut) in pending:
            _resolve(loop, fut, (("EngineDeadError", f"data-parallel replica {r.index} died: {reason}"), -1))
        _stop(r.proc)
        self._changed(r, "down")

    def _restart(self, r: _Replica) -> bool:
        """Restarts ``r`` (bounded retries, with a back-off); False when it stays down."""
        while not self._stopping and r.restarts < self.max_restarts:
            time.sleep(min(30.0, self.restart_backoff_s * 2**r.restarts))
            if self._stopping:
                return False
            r.restarts += 1
            r.state = "restarting"
            self._changed(r, "restarted")
            self._start(r)
            if r.state == "up":
                log.warning("data-parallel replica %d restarted (%d of %d)", r.index, r.restarts, self.max_restarts)
                return True
            r.state = "restarting"  # (its start failed: the next attempt comes after the back-off)
        with self._lock:
            r.state = "failed"
            if not self._stopping and all(x.state == "failed" for x in self.replicas):
                self.dead = "every data-parallel replica is down: " + "; ".join(
                    f"replica {x.index}: {x.last_error}" for x in self.replicas
                )
        return False

    def _changed(self, r: _Replica, event: str) -> None:
        for hook in self.on_replica:
            try:
                hook(r.index, event)
            except Exception:
                log.exception("a replica hook failed")

    # ----- the front (the handlers') ------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def n_waiting(self) -> int:
        """Requests waiting in the replicas' queues (after each one's last step, plus
        those sent since): what ``--max-waiting`` compares, as with one engine."""
        return sum(r.waiting + r.unreported for r in self.replicas if r.state == "up")

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def grammars(self) -> GrammarCompiler:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler.for_model(self._tokenizer, self._vocab_size, self._eos)
            return self._grammars

    async def compile_structured(self, spec: StructuredOutputsParams) -> None:
        """Checks an output constraint here, as a single engine does, before any replica
        sees it (each replica then compiles it once for its own matchers)."""
        await asyncio.to_thread(self.grammars.compile, spec)

    def status(self) -> list[ReplicaStatus]:
        return [
            ReplicaStatus(
                r.index,
                r.state,
                r.proc.pid if r.proc is not None else None,
                list(r.cpus),
                r.restarts,
                r.requests,
                r.outstanding,
                r.steps,
                r.busy_steps,
                r.last_error,
            )
            for r in self.replicas
        ]

    def _route(self, ids: Sequence[int], weight: int) -> _Replica:
        loads = [r.outstanding if r.state == "up" else None for r in self.replicas]
        i = self.router.route(loads, ids)
        if i is None:
            raise EngineDeadError(self.dead or "no data-parallel replica is up (restarting)")
        return self.replicas[i]

    async def submit_all(self, jobs: Sequence[Job]) -> list[RequestStream]:
        """Routes and queues every job (each to its replica; sent together so they
        batch), all or nothing: a refused one aborts the others and raises its error
        (InvalidRequestError: 400; EngineDeadError: no replica could take it)."""
        loop = asyncio.get_running_loop()
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead and takes no requests: {self.dead}")
        sent: list[tuple[str, _Request, asyncio.Future[Any], Route]] = []
        try:
            for ids, params, rid in jobs:
                weight = params.beam_width if isinstance(params, BeamSearchParams) else 1
                fut: asyncio.Future[Any] = loop.create_future()
                with self._lock:
                    if rid in self._requests:
                        raise InvalidRequestError(f"request id {rid!r} is already in use")
                    r = self._route(ids, weight)
                    route = Route(rid, r.index, len(ids), getattr(params, "max_tokens", None))
                    req = _Request(loop, asyncio.Queue(), RequestMetrics(time.time()), r.index, weight, route)
                    self._requests[rid] = req
                    r.outstanding += weight
                    r.requests += 1
                    seq = next(self._seq)
                    self._pending[seq] = (r.index, loop, fut)
                sent.append((rid, req, fut, route))
                try:
                    ok = r.send(("add", seq, rid, list(ids), params))
                except (pickle.PicklingError, TypeError, AttributeError) as e:
                    with self._lock:
                        self._pending.pop(seq, None)
                    raise InvalidRequestError(
                        f"the request cannot be sent to a data-parallel replica ({type(e).__name__}: {e}); "
                        "its parameters must be picklable (logits_processors: module-level functions)"
                    ) from None
                r.unreported += 1
                if not ok:
                    with self._lock:
                        self._pending.pop(seq, None)
                    _resolve(loop, fut, (("EngineDeadError", f"data-parallel replica {r.index} is down"), -1))
            replies = await asyncio.wait_for(asyncio.gather(*(f for _, _, f, _ in sent)), REPLY_TIMEOUT_S)
        except BaseException as e:
            self._take_back(sent)
            if isinstance(e, asyncio.TimeoutError):
                raise EngineDeadError(f"a data-parallel replica did not answer in {REPLY_TIMEOUT_S:.0f} s") from None
            raise
        refused = [err for err, _ in replies if err is not None]
        if refused:
            self._take_back(sent)
            name, message = refused[0]
            cls = getattr(_errors, name, None)
            raise (cls if isinstance(cls, type) and issubclass(cls, SpyreCBError) else SpyreCBError)(message)
        streams = []
        for (rid, req, _, route), (_, arrival) in zip(sent, replies):
            route.arrival_step = arrival
            self.routes.append(route)
            streams.append(RequestStream(self, rid, req.queue, req.metrics, route.prompt_len))
        return streams

    def _take_back(self, sent: Sequence[tuple[str, _Request, Any, Route]]) -> None:
        """Aborts the requests of a submission that failed (at the replicas that took them)."""
        for rid, *_ in sent:
            self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Aborts a request (any thread); unknown or finished ids are ignored."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return
            r = self.replicas[req.replica]
            r.outstanding -= req.weight
        if r.state == "up":
            r.send(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stops every replica (each finishes its step, stops its ranks and exits)."""
        self._stopping = True
        for r in self.replicas:
            if r.proc is not None:
                r.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for r in self.replicas:
            if r.proc is not None:
                r.proc.join(max(0.1, deadline - time.monotonic()))
                _stop(r.proc)
            if r.conn is not None:
                r.conn.close()
        for t in self._readers:  # (one in a restart sees _stopping and ends)
            if t is not threading.current_thread():
                t.join(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> DataParallelEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any) -> None:
    def set_it() -> None:
        if not fut.done():
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(set_it)
    except RuntimeError:  # the caller's loop is closed
        pass


def _stop(proc: Any, grace_s: float = 5.0) -> None:
    if proc is None or proc.pid is None:
        return
    proc.join(grace_s if proc.is_alive() else 0.1)
    if proc.is_alive():
        proc.terminate()
        proc.join(3.0)
    if proc.is_alive():
        proc.kill()
        proc.join(3.0)


__all__ = ["DataParallelEngine", "ReplicaStatus", "Route", "ROUTERS", "cpu_shares"]
