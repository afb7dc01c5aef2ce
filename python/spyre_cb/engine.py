"""The engine: Rust scheduler -> plan -> model runner -> sampler -> Rust update.

One step at a time::

    eng = Engine(model=path, max_num_seqs=2, max_model_len=192)
    eng.add_request("0", prompt_token_ids=[...], sampling_params=SamplingParams(max_tokens=10, temperature=0))
    while eng.has_unfinished_requests():
        for out in eng.step():
            ...
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spyre_cb import _core
from spyre_cb.errors import InvalidRequestError, UnknownRequestError
from spyre_cb.plan import IdlePlan, plan_from_dict
from spyre_cb.runner import ModelRunner, check_backend, check_model_dir
from spyre_cb.sampling import Sampler, SamplingParams


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  #: "length", "stop" or "abort" once finished
    stop_reason: int | str | None = None  #: the stop token id or string, if any
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestState:
    """Everything the engine knows about one request (prompt, output so far)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output_text(self, tokenizer) -> str:
        """Generated text (cut before a matched stop string)."""
        if self.stop_reason is not None and isinstance(self.stop_reason, str):
            return self.text
        if tokenizer is None:
            return ""
        return tokenizer.decode(self.output_token_ids, skip_special_tokens=True)


class Engine:
    """Continuous batching over an FMS model, scheduled by the Rust core."""

    def __init__(
        self,
        model: str | os.PathLike,
        max_num_seqs: int = 4,
        max_model_len: int = 512,
        available_blocks: int | None = None,
        max_batch_tkv_limit: int | None = None,
        backend: str = "eager",
        attention_ops: str = "vectorized",
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        import torch

        # cheap checks first: limits, backend, model directory
        self.scheduler = _core.Scheduler(
            max_num_seqs, max_model_len, available_blocks=available_blocks, max_batch_tkv_limit=max_batch_tkv_limit
        )
        check_backend(backend)
        path = check_model_dir(model)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            from spyre_cb.errors import ConfigError

            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.model_path = Path(path)
        self.runner = ModelRunner(
            path,
            self.scheduler.n_physical_blocks,
            backend=backend,
            attention_ops=attention_ops,
            dtype=torch_dtype,
            block_size=self.scheduler.block_size,
        )
        self.tokenizer = _load_tokenizer(path)
        self.eos_token_id = _eos_id(path, self.tokenizer)
        self.sampler = Sampler()
        self.seed = seed
        self._n_added = 0
        self.requests: dict[str, RequestState] = {}
        #: kind of the last step: "prefill", "decode", "idle" (None before any step)
        self.last_plan_kind: str | None = None

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
        """Queues a request. Raises InvalidRequestError (state unchanged) when it cannot run."""
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
            prompt_token_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        ids = _token_list(prompt_token_ids, self.vocab_size)
        # the core refuses an id still in use (and leaves everything untouched)
        self.scheduler.add_request(request_id, ids, params.max_tokens)
        state = RequestState(request_id, ids, params, prompt=prompt)
        if params.logprobs is not None:
            state.logprobs = []
        self.requests[request_id] = state
        self.sampler.start(request_id, params, self.seed + self._n_added)
        self._n_added += 1

    def abort_request(self, request_id: str) -> None:
        """Aborts a waiting or running request; its blocks return at the next step."""
        state = self.requests.get(request_id) if isinstance(request_id, str) else None
        if state is None or state.finished:
            raise UnknownRequestError(f"no unfinished request with id {request_id!r}")
        self.scheduler.abort(request_id)
        state.finish_reason = "abort"
        self.sampler.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def snapshot(self) -> _core.StepRecord:
        """The current observation (same record type as ``simulate`` returns)."""
        return self.scheduler.snapshot()

    def get_request(self, request_id: str) -> RequestState:
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequestError(f"no request with id {request_id!r}") from None

    def release(self, request_id: str) -> RequestState:
        """Forgets a finished request's state (the engine keeps it until then)."""
        state = self.get_request(request_id)
        if not state.finished:
            raise InvalidRequestError(f"request {request_id!r} has not finished")
        return self.requests.pop(request_id)

    # ----- stepping ----------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Runs one step (a prefill or a decode of the batch) and returns its outputs."""
        plan = plan_from_dict(self.scheduler.schedule())
        self.last_plan_kind = plan.kind
        if isinstance(plan, IdlePlan):
            self.scheduler.update([])
            return []
        ids = plan.request_ids
        states = [self.requests[r] for r in ids]
        try:
            logits = self.runner.execute(plan)
            sampled = self.sampler.sample(logits, ids, [s.params for s in states])
        except BaseException:
            # Close the step so the engine keeps serving; these requests end as aborted.
            self.scheduler.update([0] * len(ids), [True] * len(ids))
            for s in states:
                s.finish_reason = "abort"
                self.sampler.forget(s.request_id)
            raise
        tokens = [s.token for s in sampled]
        stopped = [self._append(s, x.token, x.logprobs) for s, x in zip(states, sampled)]
        finished = self.scheduler.update(tokens, stopped)
        done = set(finished)
        outs = []
        for s, x, stop in zip(states, sampled, stopped):
            if s.request_id in done:
                if s.finish_reason is None:
                    s.finish_reason = "stop" if stop else "length"
                self.sampler.forget(s.request_id)
            outs.append(
                StepOutput(
                    s.request_id,
                    [x.token],
                    s.request_id in done,
                    s.finish_reason,
                    s.stop_reason,
                    None if x.logprobs is None else [x.logprobs],
                )
            )
        return outs

    def steps(self) -> Iterator[list[StepOutput]]:
        """Streams step outputs until no request is left."""
        while self.has_unfinished_requests():
            yield self.step()

    def _append(self, s: RequestState, token: int, logprobs: dict[int, float] | None) -> bool:
        """Records a token; True when the request must stop early."""
        s.output_token_ids.append(token)
        if s.logprobs is not None and logprobs is not None:
            s.logprobs.append(logprobs)
        p = s.params
        if p.stop_token_ids and token in p.stop_token_ids:
            s.stop_reason = token
            s.finish_reason = "stop"
            return True
        if not p.ignore_eos and self.eos_token_id is not None and token == self.eos_token_id:
            s.finish_reason = "stop"
            return True
        if p.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
            for stop in p.stop_strings:
                at = text.find(stop, max(0, len(s.text) - len(stop)))
                if at >= 0:
                    s.text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    s.stop_reason = stop
                    s.finish_reason = "stop"
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


def _load_tokenizer(path: Path):
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a checkpoint without a usable tokenizer still runs on token ids
        return None


def _eos_id(path: Path, tokenizer) -> int | None:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    except (OSError, ValueError):
        pass
    return getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
