"""``AsyncEngine``: one thread steps the engine, coroutines submit requests.

The engine thread is the only caller of ``Engine.step()``; coroutines on any
event loop call :meth:`AsyncEngine.generate` (which adds the request through
the engine's lock, never during a forward) and read the request's outputs —
token ids and text deltas — from a queue fed by the engine thread. When the
consumer stops reading before the request finished (a client disconnected,
a task was cancelled) the request is aborted and its blocks return with the
engine's next step. A finished request's state is released once its final
output has been handed over, so nothing outlives its delivery.

Step hooks (``on_step``) run on the engine thread after every step, idle or
not (the server's metrics are updated there).

When the engine meets an error it cannot recover from (an ``ExecutorError``
from a step: a tensor-parallel worker died, the executor failed; or, while
idle, the executor reports a dead worker), the engine is dead:
:attr:`AsyncEngine.dead` says why, :meth:`AsyncEngine.submit` raises
:class:`~spyre_cb.errors.EngineDeadError`, and every open stream ends by
raising it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from spyre_cb.beam_search import BeamSearchParams
from spyre_cb.config import EngineConfig
from spyre_cb.engine import Engine, StepOutput
from spyre_cb.errors import EngineDeadError, ExecutorError, InvalidRequestError, UnknownRequestError
from spyre_cb.output_processor import RequestState
from spyre_cb.outputs import RequestMetrics
from spyre_cb.sampling import SamplingParams
from spyre_cb.structured import StructuredOutputsParams

log = logging.getLogger("spyre_cb.async_engine")

StepHook = Callable[[Engine, list[StepOutput]], None]
#: what a request's queue carries: its outputs, or the error that ended it (the engine died)
_Item = StepOutput | EngineDeadError
#: one request to queue: its prompt ids, its params, its id
Job = tuple[Sequence[int], "SamplingParams | BeamSearchParams", str]


class EngineClient(Protocol):
    """What the server's handlers use of the engine(s) behind them: an
    :class:`AsyncEngine` (one engine in this process) or a
    :class:`~spyre_cb.data_parallel.DataParallelEngine` (replicas in their own
    processes)."""

    #: why no request can be served any more (None while it serves)
    dead: str | None

    @property
    def n_waiting(self) -> int: ...
    @property
    def config(self) -> EngineConfig: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def vocab_size(self) -> int: ...
    async def compile_structured(self, spec: StructuredOutputsParams) -> None: ...
    async def submit_all(self, jobs: Sequence[Job]) -> list[RequestStream]: ...
    def abort(self, request_id: str) -> None: ...
    def shutdown(self, timeout_s: float = 10.0) -> None: ...


class AsyncEngine:
    """An :class:`~spyre_cb.engine.Engine` driven by its own thread."""

    def __init__(self, engine: Engine, *, idle_poll_s: float = 0.05) -> None:
        self.engine = engine
        engine.stream_text = True
        self.on_step: list[StepHook] = []
        #: called (on the engine thread) with the reason when the engine dies
        self.on_death: list[Callable[[str], None]] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._qlock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._idle_poll_s = idle_poll_s
        self._ids = itertools.count()
        self.steps_run = 0
        #: why the engine stopped for good (None while it runs): see the module's docstring
        self.dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="spyre-cb-engine", daemon=True)
        self._thread.start()

    # ----- the engine thread -----------------------------------------------------

    def _has_work(self) -> bool:
        if self.engine.has_unfinished_requests():
            return True
        return bool(self.engine.tkv or self.engine.n_used_blocks)  # one more step frees finished requests' blocks

    def _loop(self) -> None:
        while not self._stopping:
            if self.dead is not None or not self._has_work():
                if self.dead is None:
                    why = self.engine.executor.failure()  # a worker that died while idle
                    if why is not None:
                        self._die(why)
                self._wake.wait(self._idle_poll_s)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except ExecutorError as e:  # the executor cannot run steps any more
                self._die(str(e))
                continue
            except Exception:  # the engine aborted the step's requests; their outputs come next
                log.exception("a step failed; its requests were aborted")
                why = self.engine.executor.failure()
                if why is not None:
                    self._die(why)
                    continue
                outs = []
            self.steps_run += 1
            for hook in self.on_step:
                try:
                    hook(self.engine, outs)
                except Exception:
                    log.exception("a step hook failed")
            # one wake-up per event loop per step, not one per output
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
            with self._qlock:
                for o in outs:
                    entry = self._queues.pop(o.request_id, None) if o.finished else self._queues.get(o.request_id)
                    if entry is not None:
                        batches.setdefault(entry[0], []).append((entry[1], o))
            _hand_over(batches)
            for o in outs:
                if o.finished and o.request_id in self.engine.requests:
                    self.engine.release(o.request_id)

    def _die(self, reason: str) -> None:
        """The engine cannot run any more: refuse new requests, end every open stream."""
        log.error("the engine is dead: %s", reason)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._qlock:
            self.dead = reason
            for rid, (loop, q) in self._queues.items():
                batches.setdefault(loop, []).append(
                    (q, EngineDeadError(f"request {rid!r} ended: the engine is dead: {reason}"))
                )
            self._queues.clear()
        _hand_over(batches)
        for hook in self.on_death:
            try:
                hook(reason)
            except Exception:
                log.exception("a death hook failed")

    # ----- the front ---------------------------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def n_waiting(self) -> int:
        return self.engine.n_waiting

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    async def compile_structured(self, spec: StructuredOutputsParams) -> None:
        """Compiles an output constraint off the event loop (a cold regex takes ~0.1 s),
        so adding the request finds it cached; InvalidRequestError when it is invalid."""
        await asyncio.to_thread(self.engine.grammars.compile, spec)

    def add(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | BeamSearchParams, request_id: str
    ) -> RequestState:
        """Queues a request whose outputs go to the step hooks only (no stream),
        from any thread; InvalidRequestError (nothing queued) when it cannot run."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead and takes no requests: {self.dead}")
        if isinstance(params, BeamSearchParams):
            state = self.engine.add_beam_search(request_id, prompt_token_ids, params)
        else:
            state = self.engine.add_request(request_id, prompt_token_ids, params)
        self._wake.set()
        return state

    async def submit_all(self, jobs: Sequence[Job]) -> list[RequestStream]:
        """Queues every job at once (they batch together), all or nothing: when one
        is refused the others are aborted and its error is raised."""
        streams: list[RequestStream] = []
        try:
            for ids, params, rid in jobs:
                streams.append(self.submit(ids, params, rid))
        except BaseException:
            for st in streams:
                await st.aclose()
            raise
        return streams

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | BeamSearchParams,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queues a request (a beam search with BeamSearchParams: its one output
        comes at its end) now and returns the async iterator of its outputs. Raises
        InvalidRequestError (nothing queued) when it cannot run or its id is in use,
        EngineDeadError once the engine is dead."""
        rid = request_id if request_id is not None else self.new_request_id()
        q: asyncio.Queue[_Item] = asyncio.Queue()
        with self._qlock:
            if self.dead is not None:
                raise EngineDeadError(f"the engine is dead and takes no requests: {self.dead}")
            if rid in self._queues:  # before anything is registered: the first request keeps its queue
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            self._queues[rid] = (asyncio.get_running_loop(), q)
        try:
            state = self.add(prompt_token_ids, params, rid)
        except BaseException:
            with self._qlock:
                self._queues.pop(rid, None)
            raise
        return RequestStream(self, rid, q, state.metrics, len(state.prompt_token_ids))

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Adds a request and yields its outputs until the final one
        (``finished``). Leaving early aborts the request."""
        stream = self.submit(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Aborts a request (any thread); unknown or finished ids are ignored."""
        with self._qlock:
            self._queues.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except UnknownRequestError:
            pass
        self._wake.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        self.engine.shutdown()

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _deliver(items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for q, o in items:
        q.put_nowait(o)


def _hand_over(batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]]) -> None:
    """One wake-up per event loop: its queues' new items."""
    for loop, items in batches.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the consumer's loop is closed
            pass


def _merge(a: StepOutput, b: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one (for a consumer that fell behind)."""
    return StepOutput(
        a.request_id,
        a.new_token_ids + b.new_token_ids,
        b.finished,
        b.finish_reason,
        b.stop_reason,
        None if a.logprobs is None or b.logprobs is None else a.logprobs + b.logprobs,
        b.error,
        None if a.text is None and b.text is None else (a.text or "") + (b.text or ""),
        a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )


class Aborts(Protocol):
    """What a stream needs of the engine behind it: a way to abort its request."""

    def abort(self, request_id: str) -> None: ...


class RequestStream:
    """The outputs of one submitted request, in order; the last has ``finished``.
    Closing it (``aclose()``) before that aborts the request. A consumer that
    falls behind gets the outputs waiting for it merged into one (all their
    tokens and text), so a slow client costs one message per read, not per token.
    When the engine dies, the stream ends by raising :class:`EngineDeadError`."""

    def __init__(
        self,
        engine: Aborts,
        request_id: str,
        queue: asyncio.Queue[_Item],
        metrics: RequestMetrics,
        n_prompt_tokens: int = 0,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.done = False
        #: when the request went through the engine (arrival, first scheduled, first token, finished)
        self.metrics = metrics
        self.n_prompt_tokens = n_prompt_tokens
        #: tokens read so far, and why the request ended ("abort" when closed early, "error" when
        #: the engine died; None while it runs)
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self._dead: EngineDeadError | None = None  # the engine died after the outputs being read

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._dead is not None:
            e, self._dead = self._dead, None
            raise self._death(e)
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        if isinstance(item, EngineDeadError):
            raise self._death(item)
        out = item
        while not out.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, EngineDeadError):  # these outputs first, the error with the next read
                self._dead = nxt
                break
            out = _merge(out, nxt)
        self.n_tokens += len(out.new_token_ids)
        if out.finished:
            self.done = True
            self.finish_reason = out.finish_reason
        return out

    def _death(self, e: EngineDeadError) -> EngineDeadError:
        self.done = True
        self.finish_reason = "error"
        return e

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.finish_reason = "abort"
            self.engine.abort(self.request_id)


__all__ = ["AsyncEngine", "EngineClient", "Job", "RequestStream"]
