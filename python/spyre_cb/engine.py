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

import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from spyre_cb import _core
from spyre_cb.beam_search import BeamSearch, BeamSearchParams, BeamSearchSequence
from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.errors import ConfigError, InvalidRequestError, SchedulerStateError, UnknownRequestError
from spyre_cb.executor import make_executor
from spyre_cb.output_processor import OutputProcessor, RequestState, StepOutput
from spyre_cb.outputs import PositionLogprobs
from spyre_cb.plan import ChunkPlan, DecodePlan, IdlePlan, StepPlan
from spyre_cb.prompts import checked_token_ids
from spyre_cb.runner import ModelRunner, check_backend
from spyre_cb.sampling import SampledBatch, Sampler, SamplingParams
from spyre_cb.structured import GrammarCompiler


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
        if ckpt.is_encoder:
            raise ConfigError(
                f"{ckpt.architecture} is an embedding model: it has no generation; run it with "
                "spyre_cb.embedding.Embedder, LLM.embed or the server's /v1/embeddings"
            )
        ckpt.check_max_model_len(cfg.max_model_len)
        self.model_path = ckpt.path
        self.tokenizer = ckpt.load_tokenizer()
        #: every token id that ends a request (unless ignore_eos)
        self.eos_token_ids = ckpt.eos_token_ids(self.tokenizer)
        #: runs each plan: this process's model runner, or rank 0 of tensor_parallel_size ranks
        self.executor = make_executor(ckpt, cfg)
        self.runner: ModelRunner = self.executor.runner  # rank 0's runner
        self.sampler = Sampler()
        self.processor = OutputProcessor(self.tokenizer)
        self._n_added = 0
        #: the beam searches not yet ended (none: a step never looks for them)
        self._beam_searches: set[str] = set()
        self.requests: dict[str, RequestState] = {}
        #: kind of the last step: "prefill", "decode", "idle" (None before any step)
        self.last_plan_kind: str | None = None
        #: steps scheduled so far (a request added now can first run in step ``n_scheduled``)
        self.n_scheduled = 0
        # guards the scheduler and the request table; never held during a forward
        self._lock = threading.RLock()
        self._stepping = False
        # requests of a step that failed: their final outputs come with the next step
        # (aborts asked for by callers are queued and reported by the core)
        self._failed: list[str] = []
        # structured outputs: the grammar compiler, made on first use (the vocabulary's scan)
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @property
    def stream_text(self) -> bool:
        """Give every StepOutput its text delta (incremental detokenization; off
        by default: LLM decodes once at the end)."""
        return self.processor.stream_text

    @stream_text.setter
    def stream_text(self, on: bool) -> None:
        self.processor.stream_text = on

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

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler for this checkpoint's tokenizer (each distinct spec compiled once)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler.for_model(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._grammars

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
    ) -> RequestState:
        """Queues a request, all or nothing: InvalidRequestError (state unchanged) when it cannot run.
        Returns the request's state (the engine's until ``release``)."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        ids = self._prompt_ids(request_id, prompt_token_ids, prompt)
        if params.prompt_logprobs is not None and self.config.policy == "chunked" and self.config.prefix_caching:
            raise InvalidRequestError(
                "prompt_logprobs needs every prompt position computed, but prefix_caching skips cached ones: "
                "run without prefix_caching for prompt logprobs"
            )
        if params.n != 1:
            raise InvalidRequestError(
                f"n = {params.n}: the engine runs one completion per request; LLM.generate fans n out"
            )
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens :]  # keep the last k tokens, as vLLM does
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise InvalidRequestError(
                f"logit_bias names token {max(params.logit_bias)}, outside the model's vocabulary "
                f"(ids 0..{self.vocab_size - 1})"
            )
        max_tokens = params.max_tokens
        if max_tokens is None:  # as many as fit, like vLLM
            max_tokens = self.config.max_model_len - len(ids)
            if max_tokens < 1:
                raise InvalidRequestError(
                    f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len "
                    f"{self.config.max_model_len}"
                )
            if params.min_tokens > max_tokens:
                raise InvalidRequestError(
                    f"min_tokens {params.min_tokens} is more than the {max_tokens} tokens that fit after a "
                    f"prompt of {len(ids)} tokens within max_model_len {self.config.max_model_len}"
                )
        matcher = None
        if params.structured_outputs is not None:
            # compiled here (once per distinct spec): an invalid one is refused before anything is queued
            g = self.grammars
            matcher = g.matcher(g.compile(params.structured_outputs))
        state = RequestState(request_id, ids, params, prompt=prompt, stop_rule=params.stop_rule(self.eos_token_ids))
        if params.logprobs is not None:
            state.logprobs = []
            state.cumulative_logprob = 0.0
        with self._lock:
            # everything that may fail before the core queues the request: the core's checks
            # (an id still in use, the limits), then this request's random generator
            self.scheduler.validate(request_id, len(ids), max_tokens)
            self.sampler.start(request_id, params, self.config.seed + self._n_added, matcher)
            rule = state.stop_rule
            try:
                # the core ends the request on its stop ids and EOS (after min_tokens) and at max_tokens
                self.scheduler.add_request(
                    request_id,
                    ids,
                    max_tokens,
                    stop_token_ids=list(rule.stop_token_ids),
                    eos_token_ids=list(rule.eos_token_ids),
                    min_tokens=rule.min_tokens,
                )
            except BaseException:
                self.sampler.forget(request_id)
                raise
            self.requests[request_id] = state
            state.arrival_step = self.n_scheduled
            self._n_added += 1
        return state

    def add_beam_search(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | None,
        params: BeamSearchParams,
        *,
        prompt: str | None = None,
    ) -> RequestState:
        """Queues a beam search (see :mod:`spyre_cb.beam_search`), all or nothing.
        Its one output comes when it finishes: ``StepOutput.beams``, best first."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        params.validate()
        ids = self._prompt_ids(request_id, prompt_token_ids, prompt)
        # the search decides on EOS itself: the core ends it at max_tokens or when told
        state = RequestState(request_id, ids, SamplingParams(max_tokens=params.max_tokens, ignore_eos=True), prompt)
        state.beam = BeamSearch(params, self.eos_token_ids)
        with self._lock:
            self.scheduler.add_request(request_id, ids, params.max_tokens, beam_width=params.beam_width)
            self.requests[request_id] = state
            state.arrival_step = self.n_scheduled
            self._n_added += 1
            self._beam_searches.add(request_id)
        return state

    def _prompt_ids(self, request_id: object, prompt_token_ids: Sequence[int] | None, prompt: str | None) -> list[int]:
        """A new request's prompt as token ids (checked against the vocabulary): the
        ids given, or ``prompt`` tokenized as the checkpoint's tokenizer does by default
        (BOS where it adds one), like HF and vLLM."""
        if not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a str, got {type(request_id).__name__}")
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("give prompt_token_ids or prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompt must be a str, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise InvalidRequestError("this model directory has no tokenizer: give prompt_token_ids")
            check_text(prompt, "prompt")
            prompt_token_ids = self.tokenizer(prompt).input_ids
        return checked_token_ids(prompt_token_ids, self.vocab_size)

    def abort_request(self, request_id: str) -> None:
        """Aborts a waiting or running request, from any thread. The core applies
        it (at once, or when the step in flight closes) and reports it with the
        next step, which yields the request's final output."""
        with self._lock:
            state = self.requests.get(request_id) if isinstance(request_id, str) else None
            if state is None or state.finished:
                raise UnknownRequestError(f"no unfinished request with id {request_id!r}")
            self.scheduler.abort(request_id)
            if not self.scheduler.step_in_flight:
                self._end(state, "abort")  # applied now; the final output comes with the next step
            # else: the step in flight applies it when it closes (unless the request finishes in it)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._failed)

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
        """Runs one step: schedule (the core's plan), execute (the forward), sample,
        commit (the core's update); returns what it produced for each request."""
        with self._lock:
            if self._stepping:
                raise SchedulerStateError("step() is already running in another thread")
            self._stepping = True
            try:
                plan: StepPlan = self.scheduler.schedule()
            except BaseException:
                self._stepping = False
                raise
            self.n_scheduled += 1
            # requests of the last failed step: their final outputs come first
            failed, self._failed = self._failed, []
        try:
            self.last_plan_kind = plan.kind
            logits, states = self._execute(plan)
            if self._beam_searches and any(s.beam is not None for s in states):
                outs = self._commit_beams(*self._sample_beams(logits, states))
            else:
                sampled = self._sample(logits, states)
                outs = self._commit(states, sampled)
        except BaseException as e:
            with self._lock:
                self._failed[:0] = failed  # delivered by the next step instead
            self._fail_step(plan, e)
            raise
        finally:
            self._stepping = False
        return [self.processor.final_abort(self.requests[r]) for r in failed if r in self.requests] + outs

    def _execute(self, plan: StepPlan) -> tuple[Any, list[RequestState]]:
        """The plan's forward: the logits of the sequences that sample, and their requests.
        A prefill or chunk also records its prompt logprobs when the request asks for them."""
        if isinstance(plan, IdlePlan):
            return None, []
        if isinstance(plan, DecodePlan):
            return self.executor.execute(plan), [self.requests[r] for r in plan.request_ids]
        # a prefill is one chunk: the whole prompt, the last one
        start, last = (plan.start, plan.is_last) if isinstance(plan, ChunkPlan) else (0, True)
        state = self.requests[plan.request_id]
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = time.time()
        if state.params.prompt_logprobs is not None:
            rows = self.executor.execute(plan, all_positions=True)  # one per computed prompt token
            so_far: list[PositionLogprobs | None] = [None] if start == 0 else (state.prompt_logprobs or [])
            given = rows[:-1] if last else rows  # the last prompt token's row samples the first token
            state.prompt_logprobs = so_far + self.processor.prompt_logprobs(state, given, start + 1)
            logits = rows[-1][None]
        else:
            logits = self.executor.execute(plan)
        return (logits, [state]) if last else (None, [])

    def _sample(self, logits: Any, states: list[RequestState]) -> SampledBatch:
        """One token per sequence; stop strings are checked here, before the commit."""
        if not states:
            return SampledBatch([], [], {})
        sampled = self.sampler.sample(logits, states)
        # without the engine's lock: only the step's own requests' text is touched, so
        # add_request and abort from other threads never wait for a stop-string scan
        sampled.stopped = self.processor.stop_strings(states, sampled)
        return sampled

    def _commit(self, states: list[RequestState], sampled: SampledBatch) -> list[StepOutput]:
        """Closes the step in the core (the last thing that can fail), then records
        what it produced; the core decides which requests ended and why."""
        with self._lock:
            outcome = self.scheduler.update(sampled.tokens, sampled.stopped)
            finished = {
                rid: (why, tok) for rid, why, tok in zip(outcome.finished, outcome.finish_reasons, outcome.stop_reasons)
            }
            outs: list[StepOutput] = []
            if outcome.aborted:  # between steps, or while waiting during this one: their final outputs first
                mine = {s.request_id for s in states}
                outs = [o for o in (self._aborted(r) for r in outcome.aborted if r not in mine) if o is not None]
            step_outs, ended = self.processor.emit(states, sampled, finished, set(outcome.aborted), time.time())
            for rid in ended:
                self.sampler.forget(rid)
            return outs + step_outs

    def _sample_beams(self, logits: Any, states: list[RequestState]) -> tuple[list[RequestState], SampledBatch, _Beams]:
        """A step with beam searches: the other rows sampled as usual, each search's
        rows (one before its first token, then one per beam) through its
        :class:`BeamSearch`; the tokens, stop flags and parents of every sequence of
        the step, in the core's order (a search's first step: one per beam)."""
        plain = [i for i, s in enumerate(states) if s.beam is None]
        plain_states = [states[i] for i in plain]
        sampled = self._sample(logits[plain] if plain else None, plain_states)
        beams = _Beams([], [], [], [])
        at_plain = 0
        i = 0
        while i < len(states):
            s = states[i]
            search = s.beam
            if search is None:
                beams.tokens.append(sampled.tokens[at_plain])
                beams.stopped.append(sampled.stopped[at_plain] if sampled.stopped else False)
                beams.parents.append(len(beams.parents))
                at_plain += 1
                i += 1
                continue
            rows = 1 if not search.started else search.params.beam_width
            first = len(beams.parents)
            tokens, parents = search.step(logits[i : i + rows])
            beams.tokens.extend(tokens)
            beams.stopped.extend([search.done] * len(tokens))
            # before the first token every beam continues the prompt (the core's default)
            beams.parents.extend(first + (p if rows > 1 else 0) for p in parents)
            beams.searches.append(s)
            i += rows
        return plain_states, sampled, beams

    def _commit_beams(self, states: list[RequestState], sampled: SampledBatch, beams: _Beams) -> list[StepOutput]:
        """:meth:`_commit` of a step with beam searches: a search's one output comes
        when it ends (its beams, best first), or its abort."""
        with self._lock:
            outcome = self.scheduler.update(beams.tokens, beams.stopped, beams.parents)
            finished = {
                rid: (why, tok) for rid, why, tok in zip(outcome.finished, outcome.finish_reasons, outcome.stop_reasons)
            }
            mine = {s.request_id for s in states}
            outs = [o for o in (self._aborted(r) for r in outcome.aborted if r not in mine) if o is not None]
            step_outs, ended = self.processor.emit(states, sampled, finished, set(outcome.aborted), time.time())
            for rid in ended:
                self.sampler.forget(rid)
            for s in beams.searches:
                if s.request_id in finished and s.beam is not None:
                    outs.append(self._beam_output(s))
            return outs + step_outs

    def beam_result(self, s: RequestState) -> list[BeamSearchSequence]:
        """A beam search's finished beams, best first, with their texts."""
        if s.beam is None:
            raise InvalidRequestError(f"request {s.request_id!r} is not a beam search")
        tok = self.tokenizer
        return s.beam.result(
            s.prompt_token_ids, (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok else None
        )

    def _beam_output(self, s: RequestState) -> StepOutput:
        """A finished beam search's final output (and its state: the best beam's tokens and text)."""
        seqs = self.beam_result(s)
        self._beam_searches.discard(s.request_id)
        best = seqs[0]
        s.output_token_ids = list(best.output_token_ids)
        s.text = best.text or ""
        self.processor.end(s, best.finish_reason)
        s.stop_reason = best.stop_reason
        return StepOutput(
            s.request_id, list(best.output_token_ids), True, best.finish_reason, best.stop_reason, beams=seqs
        )

    def _aborted(self, request_id: str) -> StepOutput | None:
        """The final output of a request the core reported aborted (None once released)."""
        s = self.requests.get(request_id)
        if s is None:
            return None  # released by its caller since: nobody waits for its output
        self._end(s, "abort")
        return self.processor.final_abort(s)

    def _fail_step(self, plan: StepPlan, e: BaseException) -> None:
        """Ends the step's requests as aborted, whether it failed before its commit
        (the core cancels the step) or after it (the core aborts them)."""
        reason = f"the step failed: {type(e).__name__}: {e}"
        in_plan = set(plan.request_ids) | {getattr(plan, "request_id", "")}
        with self._lock:
            if self.scheduler.step_in_flight:
                # the core cancels the step: every id it reports is ended here, its
                # final output delivered by the next step
                undelivered = [r for r in self.scheduler.cancel().aborted if r in self.requests]
                ended = undelivered
            else:
                # after the commit, its outcome lost: the core aborts the step's unfinished
                # requests and reports them with the next step; one that already ended in the
                # core, and every abort the lost outcome reported, is delivered here
                ended = [r for r in self.scheduler.last_aborted if r not in in_plan and r in self.requests]
                undelivered = list(ended)
                for rid in dict.fromkeys(plan.request_ids):  # (a beam search lists its id per beam)
                    state = self.requests.get(rid)
                    if state is None or state.finished:
                        continue
                    try:
                        self.scheduler.abort(rid)
                    except UnknownRequestError:
                        undelivered.append(rid)  # it finished in the core with this step
                    ended.append(rid)
            for rid in ended:
                # the step's own requests end with its error; others the cancel reported were aborted by callers
                self._end(self.requests[rid], "abort", error=reason if rid in in_plan else None)
            self._failed.extend(undelivered)

    def _end(self, s: RequestState, reason: str, error: str | None = None) -> None:
        self.processor.end(s, reason, error)
        self.sampler.forget(s.request_id)
        self._beam_searches.discard(s.request_id)

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


@dataclasses.dataclass(slots=True)
class _Beams:
    """A step with beam searches: every sequence's token, stop flag and parent
    (the core's order), and the searches that ran."""

    tokens: list[int]
    stopped: list[bool]
    parents: list[int]
    searches: list[RequestState]


def check_text(text: str, what: str) -> None:
    """Refuses text a tokenizer cannot encode (a lone surrogate, which JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{what} is not valid Unicode text: {e.reason} at character {e.start} ({text[e.start]!r})"
        ) from None
