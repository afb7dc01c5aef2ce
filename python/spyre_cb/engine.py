"""The engine: Rust scheduler -> plan -> model runner -> sampler -> Rust update.

One step at a time::

    eng = Engine(model=path, max_num_seqs=2, max_model_len=192)
    eng.add_request("0", prompt_token_ids=[...], sampling_params=SamplingParams(max_tokens=10, temperature=0))
    while eng.has_unfinished_requests():
        for out in eng.step():
            ...

Every step is a transaction: whatever is raised between ``schedule()`` and
``update()`` (a failing forward, a KeyboardInterrupt in a stop-string check),
the step is closed in the core with its requests aborted, and the engine
serves the next call. A request whose own sampling fails ends alone
(``finish_reason="abort"``, the reason in ``StepOutput.error``).

Threading: ``add_request``, ``abort_request`` and the look-ups may be called
from any thread while another thread runs ``step()``. An abort is always
accepted: it takes effect at once between steps, or when the step in flight
closes; either way the request's final output (``finish_reason="abort"``)
comes out of the next ``step()`` that ends it. Only one thread may call
``step()`` at a time.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from spyre_cb import _core
from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.detokenizer import IncrementalDetokenizer
from spyre_cb.errors import ConfigError, InvalidRequestError, SchedulerStateError, UnknownRequestError
from spyre_cb.executor import make_executor
from spyre_cb.outputs import PositionLogprobs, RequestMetrics
from spyre_cb.plan import ChunkPlan, IdlePlan, PrefillPlan, StepPlan
from spyre_cb.runner import ModelRunner, check_backend
from spyre_cb.sampling import SampledBatch, Sampler, SamplingParams, top_logprobs


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  #: "length", "stop" or "abort" once finished
    stop_reason: int | str | None = None  #: the stop token id or string, if any
    logprobs: list[PositionLogprobs] | None = None
    error: str | None = None  #: why an aborted request was aborted by the engine
    #: the text these tokens add, with ``Engine.stream_text`` (never part of a stop
    #: string; on the final output, whatever was held back)
    text: str | None = None


@dataclass
class RequestState:
    """Everything the engine knows about one request (prompt, output so far)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    #: made on first use, for requests with stop strings or streamed text
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    #: output tokens the detokenizer has seen, and characters of text streamed so far
    n_detokenized: int = field(default=0, repr=False)
    n_streamed_chars: int = field(default=0, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output_text(self, tokenizer: Any) -> str:
        """Generated text (cut before a matched stop string)."""
        if self.stop_reason is not None and isinstance(self.stop_reason, str):
            return self.text
        if tokenizer is None:
            return ""
        text: str = tokenizer.decode(self.output_token_ids, skip_special_tokens=self.params.skip_special_tokens)
        return text


class Engine:
    """Continuous batching over an FMS model, scheduled by the Rust core.

    ``Engine(model="tiny", config=None, **options)``, as ``LLM``: ``model`` is a
    Hugging Face checkpoint directory, or ``"tiny"`` for the offline
    random-weight test model (built once into ``$SPYRE_CB_CACHE`` or
    ``~/.cache/spyre_cb``); without it, the config's model (default ``"tiny"``).
    The options are the fields of :class:`~spyre_cb.config.EngineConfig`
    (``max_num_seqs``, ``max_model_len``, ``available_blocks``,
    ``max_batch_tkv_limit``, ``backend``, ``attention_ops``, ``dtype``, ``seed``).
    """

    def __init__(
        self, model: str | os.PathLike[str] | None = None, config: EngineConfig | None = None, **options: Any
    ) -> None:
        if model is not None:  # else the config's model, or the tiny one
            if not isinstance(model, (str, os.PathLike)):
                raise ConfigError(f"model must be a checkpoint directory path or 'tiny', got {type(model).__name__}")
            options["model"] = os.fspath(model)
        # cheap checks first: limits, backend, model directory
        cfg = EngineConfig.from_kwargs(config, **options)
        check_backend(cfg.backend)  # before the tiny model is built or any file is read
        self.config = cfg = cfg.with_model_path()
        self.scheduler = _core.Scheduler(cfg.scheduler)
        ckpt = Checkpoint.open(cfg.model, allow_unverified=cfg.allow_unverified_architectures)
        ckpt.check_max_model_len(cfg.max_model_len)
        self.model_path = ckpt.path
        self.tokenizer = ckpt.load_tokenizer()
        #: every token id that ends a request (unless ignore_eos)
        self.eos_token_ids = ckpt.eos_token_ids(self.tokenizer)
        #: runs each plan: this process's model runner, or rank 0 of tensor_parallel_size ranks
        self.executor = make_executor(ckpt, cfg)
        self.runner: ModelRunner = self.executor.runner  # rank 0's runner
        self.sampler = Sampler()
        self._n_added = 0
        self.requests: dict[str, RequestState] = {}
        #: kind of the last step: "prefill", "decode", "idle" (None before any step)
        self.last_plan_kind: str | None = None
        # guards the scheduler and the request table; never held during a forward
        self._lock = threading.RLock()
        self._stepping = False
        # aborted between steps: their final outputs come with the next step
        self._unreported_aborts: list[str] = []
        #: give every StepOutput its text delta (incremental detokenization;
        #: off by default: LLM decodes once at the end)
        self.stream_text = False

    def shutdown(self) -> None:
        """Stops tensor-parallel workers (nothing to do for a single process); idempotent."""
        self.executor.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----- requests ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
    ) -> None:
        """Queues a request, all or nothing: InvalidRequestError (state unchanged) when it cannot run."""
        if not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a str, got {type(request_id).__name__}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("give prompt_token_ids or prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompt must be a str, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise InvalidRequestError("this model directory has no tokenizer: give prompt_token_ids")
            # as the checkpoint's tokenizer does by default (BOS where it adds one), like HF and vLLM
            prompt_token_ids = self.tokenizer(prompt).input_ids
        if params.prompt_logprobs is not None and self.config.policy == "chunked" and self.config.prefix_caching:
            raise InvalidRequestError(
                "prompt_logprobs needs every prompt position computed, but prefix_caching skips cached ones: "
                "run without prefix_caching for prompt logprobs"
            )
        if params.n != 1:
            raise InvalidRequestError(
                f"n = {params.n}: the engine runs one completion per request; LLM.generate fans n out"
            )
        ids = _token_list(prompt_token_ids, self.vocab_size)
        max_tokens = params.max_tokens
        if max_tokens is None:  # as many as fit, like vLLM
            max_tokens = self.config.max_model_len - len(ids)
            if max_tokens < 1:
                raise InvalidRequestError(
                    f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len "
                    f"{self.config.max_model_len}"
                )
        state = RequestState(request_id, ids, params, prompt=prompt)
        if params.logprobs is not None:
            state.logprobs = []
            state.cumulative_logprob = 0.0
        with self._lock:
            # the core refuses an id still in use (and leaves everything untouched)
            # the core ends the request on its stop ids and EOS (after min_tokens) and at max_tokens
            self.scheduler.add_request(
                request_id,
                ids,
                max_tokens,
                stop_token_ids=list(params.stop_token_ids or ()),
                eos_token_ids=[] if params.ignore_eos else sorted(self.eos_token_ids),
                min_tokens=params.min_tokens,
            )
            try:
                self.sampler.start(request_id, params, self.config.seed + self._n_added)
                self.requests[request_id] = state
            except BaseException:
                self.scheduler.abort(request_id)  # waiting: gone at once, or queued during a step
                self.requests.pop(request_id, None)
                raise
            self._n_added += 1

    def abort_request(self, request_id: str) -> None:
        """Aborts a waiting or running request, from any thread; its blocks return at the next step."""
        with self._lock:
            state = self.requests.get(request_id) if isinstance(request_id, str) else None
            if state is None or state.finished:
                raise UnknownRequestError(f"no unfinished request with id {request_id!r}")
            self.scheduler.abort(request_id)
            if not self.scheduler.step_in_flight:
                self._end(state, "abort")
                self._unreported_aborts.append(request_id)
            # else: the step in flight reports it when it closes

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._unreported_aborts)

    # The core's counters, for observers polling every step (snapshot() builds every id list
    # and, chunked, the block tables). Each is one call into the core, no lock: two reads may
    # straddle an add or abort from another thread.
    @property
    def tkv(self) -> int:
        return self.scheduler.tkv

    @property
    def n_waiting(self) -> int:
        return self.scheduler.n_waiting

    @property
    def n_running(self) -> int:
        return self.scheduler.n_running

    @property
    def n_used_blocks(self) -> int:
        return self.scheduler.n_used_blocks

    @property
    def n_reserved_blocks(self) -> int:
        return self.scheduler.n_reserved_blocks

    def snapshot(self) -> _core.StepRecord:
        """The current observation (same record type as ``simulate`` returns)."""
        with self._lock:
            return self.scheduler.snapshot()

    def get_request(self, request_id: str) -> RequestState:
        try:
            return self.requests[request_id]
        except (KeyError, TypeError):
            raise UnknownRequestError(f"no request with id {request_id!r}") from None

    def release(self, request_id: str) -> RequestState:
        """Forgets a finished request's state (the engine keeps it until then)."""
        with self._lock:
            state = self.get_request(request_id)
            if not state.finished:
                raise InvalidRequestError(f"request {request_id!r} has not finished")
            return self.requests.pop(request_id)

    # ----- stepping ----------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Runs one step (a prefill or a decode of the batch) and returns its outputs."""
        with self._lock:
            if self._stepping:
                raise SchedulerStateError("step() is already running in another thread")
            self._stepping = True
            try:
                plan: StepPlan = self.scheduler.schedule()
            except BaseException:
                self._stepping = False
                raise
            # requests that ended between steps: their final outputs come first
            ended, self._unreported_aborts = self._unreported_aborts, []
        try:
            self.last_plan_kind = plan.kind
            outs = self._run(plan)
        except BaseException as e:
            with self._lock:
                self._unreported_aborts[:0] = ended  # delivered by the next step instead
            self._fail_step(plan, e)
            raise
        finally:
            self._stepping = False
        return [self._abort_output(self.requests[r]) for r in ended if r in self.requests] + outs

    def _fail_step(self, plan: StepPlan, e: BaseException) -> None:
        """Ends the step's requests as aborted, whether it failed before its commit
        (the core cancels the step) or after it (the core aborts them)."""
        reason = f"the step failed: {type(e).__name__}: {e}"
        with self._lock:
            if self.scheduler.step_in_flight:
                ended = self.scheduler.cancel().aborted
            else:
                ended = []
                for rid in plan.request_ids:
                    state = self.requests.get(rid)
                    if state is None or state.finished:
                        continue
                    try:
                        self.scheduler.abort(rid)
                    except UnknownRequestError:
                        pass  # it finished in the core with this step: its blocks return anyway
                    ended.append(rid)
            for rid in ended:
                self._end(self.requests[rid], "abort", error=reason)
            # their final outputs (finish_reason "abort", the error) come with the next step
            self._unreported_aborts.extend(ended)

    def _run(self, plan: StepPlan) -> list[StepOutput]:
        """Executes the plan; ``update`` (the commit) is the last thing that can fail."""
        if isinstance(plan, IdlePlan):
            with self._lock:
                return self._close([], SampledBatch([], [], {}), [])
        if isinstance(plan, ChunkPlan):
            return self._run_chunk(plan)
        states = [self.requests[r] for r in plan.request_ids]
        if isinstance(plan, PrefillPlan) and states[0].metrics.first_scheduled_time is None:
            states[0].metrics.first_scheduled_time = time.time()
        if isinstance(plan, PrefillPlan) and states[0].params.prompt_logprobs is not None:
            every = self.executor.execute(plan, all_positions=True)  # [prompt_len, vocab]
            logits = every[-1][None]
            states[0].prompt_logprobs = self._prompt_logprobs(states[0], every[:-1])
        else:
            logits = self.executor.execute(plan)
        sampled = self.sampler.sample(logits, states, self.eos_token_ids)
        with self._lock:
            stopped = [
                i in sampled.errors or self._stop_string(s, t) for i, (s, t) in enumerate(zip(states, sampled.tokens))
            ]
            return self._close(states, sampled, stopped)

    def _run_chunk(self, plan: ChunkPlan) -> list[StepOutput]:
        """One prefill chunk; only the last one samples (the request's first token)."""
        state = self.requests[plan.request_id]
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = time.time()
        if state.params.prompt_logprobs is not None:
            real = self.executor.execute(plan, all_positions=True)  # [end - start, vocab]
            so_far: list[PositionLogprobs | None] = [None] if plan.start == 0 else (state.prompt_logprobs or [])
            rows = real[:-1] if plan.is_last else real  # the last row samples the first token
            state.prompt_logprobs = so_far + self._prompt_logprobs_from(state, rows, plan.start + 1)
            logits = real[-1][None]
        else:
            logits = self.executor.execute(plan)
        if not plan.is_last:
            with self._lock:
                return self._close([], SampledBatch([], [], {}), [])
        states = [state]
        sampled = self.sampler.sample(logits, states, self.eos_token_ids)
        with self._lock:
            stopped = [0 in sampled.errors or self._stop_string(state, sampled.tokens[0])]
            return self._close(states, sampled, stopped)

    def _close(self, states: list[RequestState], sampled: SampledBatch, stopped: list[bool]) -> list[StepOutput]:
        """Commits the step in the core, then records what it produced (nothing here can fail midway)."""
        outcome = self.scheduler.update(sampled.tokens, stopped)
        # how each finished request ended is the core's decision
        finished = {
            rid: (why, tok) for rid, why, tok in zip(outcome.finished, outcome.finish_reasons, outcome.stop_reasons)
        }
        aborted = set(outcome.aborted)
        errors = sampled.errors
        now = time.time()
        outs = []
        for i, (s, token, lp) in enumerate(zip(states, sampled.tokens, sampled.logprobs)):
            if s.request_id in aborted:
                outs.append(self._abort_output(s, "abort"))
                continue
            if i in errors:
                self._end(s, "abort", error=errors[i])
                outs.append(self._abort_output(s))
                continue
            s.output_token_ids.append(token)
            m = s.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.n_tokens += 1
            if s.logprobs is not None and lp is not None:
                self._decode_tokens(lp)
                s.logprobs.append(lp)
                s.cumulative_logprob = (s.cumulative_logprob or 0.0) + lp[token].logprob
            done = s.request_id in finished
            if done:
                why, stop_token = finished[s.request_id]
                if stop_token is not None:
                    s.stop_reason = stop_token
                self._end(s, why)
            out = StepOutput(s.request_id, [token], done, s.finish_reason, s.stop_reason, None if lp is None else [lp])
            if self.stream_text and self.tokenizer is not None:
                out.text = self._text_delta(s, done)
            outs.append(out)
        for rid in outcome.aborted:  # aborted while waiting, during this step
            s = self.requests[rid]
            if not s.finished:
                outs.append(self._abort_output(s, "abort"))
        return outs

    def _text_delta(self, s: RequestState, done: bool) -> str:
        """The text the request's newest tokens add (incremental: O(1) per token).
        While a stop string could still be completing, its possible start is held back."""
        if s.detokenizer is None:
            s.detokenizer = IncrementalDetokenizer(self.tokenizer, s.params.skip_special_tokens)
        for t in s.output_token_ids[s.n_detokenized :]:
            s.detokenizer.push(t)
        s.n_detokenized = len(s.output_token_ids)
        stops = s.params.stop_strings
        if not stops:
            # the stream holds back an unfinished character; the final text is the
            # whole decode (as LLM.generate returns it), of which it is a prefix
            s.text = s.output_text(self.tokenizer) if done else s.detokenizer.text
        text = s.text  # cut before a matched stop string (or through it, when asked)
        visible = len(text)
        if stops and not done:
            # hold back a suffix that may be the start of a stop string
            for stop in stops:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        visible = min(visible, len(text) - k)
                        break
        delta = text[s.n_streamed_chars : visible]
        s.n_streamed_chars = max(s.n_streamed_chars, visible)
        return delta

    def _decode_tokens(self, lp: PositionLogprobs) -> None:
        if self.tokenizer is not None:
            for t, entry in lp.items():
                entry.decoded_token = self.tokenizer.decode([t])

    def _prompt_logprobs(self, s: RequestState, logits: Any) -> list[PositionLogprobs | None]:
        """Logprobs of prompt tokens 1.. given the tokens before them (the first has none)."""
        return [None] + self._prompt_logprobs_from(s, logits, 1)

    def _prompt_logprobs_from(self, s: RequestState, logits: Any, first: int) -> list[PositionLogprobs | None]:
        """Logprobs of prompt tokens ``first..`` from the logits of the positions before them."""
        import torch

        k = s.params.prompt_logprobs or 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        out: list[PositionLogprobs | None] = []
        for d in top_logprobs(logp, k, s.prompt_token_ids[first : first + logits.shape[0]]):
            self._decode_tokens(d)
            out.append(d)
        return out

    def _end(self, s: RequestState, reason: str, error: str | None = None) -> None:
        if s.finish_reason is None:
            s.finish_reason = reason
            s.error = error
            s.metrics.finished_time = time.time()
        self.sampler.forget(s.request_id)

    def _abort_output(self, s: RequestState, end: str | None = None) -> StepOutput:
        if end is not None:
            self._end(s, end)
        return StepOutput(s.request_id, [], True, "abort", None, None, s.error)

    def steps(self, release: bool = True) -> Iterator[list[StepOutput]]:
        """Streams step outputs until no request is left. With ``release`` (the
        default) a finished request's state is dropped once its final output
        has been yielded, so a long stream keeps no finished requests."""
        while self.has_unfinished_requests():
            outs = self.step()
            yield outs
            if release:
                for o in outs:
                    if o.finished and o.request_id in self.requests:
                        self.release(o.request_id)

    def _stop_string(self, s: RequestState, token: int) -> bool:
        """Whether the text now contains one of the request's stop strings (decided
        before the commit; stop ids, EOS and max_tokens are the core's to check)."""
        p = s.params
        if p.stop_strings and self.tokenizer is not None:
            if s.detokenizer is None:
                s.detokenizer = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            before = len(s.detokenizer.text)
            s.detokenizer.push(token)  # O(1) per token, not a decode of the whole output
            s.n_detokenized += 1
            text = s.detokenizer.text
            for stop in p.stop_strings:
                at = text.find(stop, max(0, before - len(stop) + 1))
                if at >= 0:
                    s.text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    s.stop_reason = stop
                    return True
            s.text = text
        return False


def _token_list(ids: Sequence[int], vocab_size: int) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise InvalidRequestError("prompt_token_ids must be a sequence of ints, got str")
    try:
        out = list(ids)
    except TypeError:
        raise InvalidRequestError(f"prompt_token_ids must be a sequence of ints, got {type(ids).__name__}") from None
    for i, t in enumerate(out):
        try:
            if isinstance(t, bool):
                raise TypeError
            out[i] = t = operator.index(t)  # int, numpy integer, ...
        except TypeError:
            raise InvalidRequestError(f"prompt_token_ids[{i}] must be an int, got {type(t).__name__}") from None
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"prompt_token_ids[{i}] = {t} is outside the model's vocabulary (ids 0..{vocab_size - 1})"
            )
    return out
