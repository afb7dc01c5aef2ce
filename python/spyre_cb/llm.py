"""``LLM``: offline batch generation on top of the engine (vLLM's shape)."""

from __future__ import annotations

import itertools
import operator
import os
from collections.abc import Iterable, Sequence
from typing import Any

from spyre_cb.config import EngineConfig
from spyre_cb.engine import Engine
from spyre_cb.errors import InvalidRequestError, UnknownRequestError
from spyre_cb.outputs import CompletionOutput, RequestOutput
from spyre_cb.sampling import SamplingParams

PromptLike = str | Sequence[int]


class LLM:
    """Continuous-batching generation over an FMS model.

    ``LLM(model="tiny", config=None, **options)``: ``model`` is a Hugging Face
    checkpoint directory, or ``"tiny"`` for the offline random-weight test
    model (built once into ``$SPYRE_CB_CACHE`` or ``~/.cache/spyre_cb``); the
    options are the fields of :class:`~spyre_cb.config.EngineConfig`.
    """

    def __init__(
        self, model: str | os.PathLike[str] = "tiny", config: EngineConfig | None = None, **options: Any
    ) -> None:
        cfg = EngineConfig.from_kwargs(
            config, model=os.fspath(model) if isinstance(model, os.PathLike) else model, **options
        )
        if cfg.model == "tiny":
            from spyre_cb.models import tiny_model_path

            cfg = cfg.replace(model=str(tiny_model_path()))
        self.engine = Engine(config=cfg)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs in input order."""
        batch = _as_batch(prompts)
        if sampling_params is None:
            params = [SamplingParams() for _ in batch]
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise InvalidRequestError(
                    f"got {len(params)} sampling_params for {len(batch)} prompts: give one, or one per prompt"
                )
        ids: list[str] = []
        try:
            for prompt, p in zip(batch, params):
                rid = f"llm-{next(self._ids)}"
                if isinstance(prompt, str):
                    self.engine.add_request(rid, sampling_params=p, prompt=prompt)
                else:
                    self.engine.add_request(rid, list(prompt), p)
                ids.append(rid)
        except BaseException:
            for rid in ids:  # all or nothing: take back what this call queued
                self.engine.abort_request(rid)
                self.engine.release(rid)
            raise
        try:
            self._run(ids, use_tqdm)
        except BaseException:
            # interrupted or failed: take back this call's requests so the
            # next call does not compute them silently
            for rid in ids:
                try:
                    self.engine.abort_request(rid)
                except UnknownRequestError:
                    pass  # finished (or already ended by the failed step)
                self.engine.release(rid)
            raise
        return [self._output(rid) for rid in ids]

    def _run(self, ids: list[str], use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        mine = set(ids)
        left = set(ids)
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while left:
                for out in self.engine.step():
                    if out.finished and out.request_id in mine:
                        left.discard(out.request_id)
                        bar.update(1)

    def _output(self, rid: str) -> RequestOutput:
        s = self.engine.release(rid)
        text = s.output_text(self.engine.tokenizer)
        comp = CompletionOutput(0, text, list(s.output_token_ids), s.logprobs, s.finish_reason, s.stop_reason)
        return RequestOutput(rid, s.prompt, list(s.prompt_token_ids), [comp], True)


def _token_ids(x: object) -> list[int] | None:
    """``x`` as token ids (ints or NumPy integers, never bools), or None."""
    if isinstance(x, (str, bytes, dict)) or not isinstance(x, Iterable):
        return None
    out = []
    for t in x:
        if isinstance(t, bool):
            return None
        try:
            out.append(operator.index(t))
        except TypeError:
            return None
    return out


def _one_prompt(x: object, where: str) -> PromptLike:
    """One prompt in any of vLLM's forms: a str, token ids, ``{"prompt": str}``
    or ``{"prompt_token_ids": [...]}``."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        if set(x) == {"prompt"} and isinstance(x["prompt"], str):
            return x["prompt"]
        if set(x) == {"prompt_token_ids"}:
            ids = _token_ids(x["prompt_token_ids"])
            if ids is not None:
                return ids
        raise InvalidRequestError(
            f"{where}: a prompt dict is {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, got keys {sorted(x)}"
        )
    ids = _token_ids(x)
    if ids is None:
        raise InvalidRequestError(
            f"{where} must be a string, a list of token ids, or a prompt dict, got {type(x).__name__}"
        )
    return ids


def _as_batch(prompts: object) -> list[PromptLike]:
    """One prompt or a list of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts, "prompt")]
    if not isinstance(prompts, Iterable):
        raise InvalidRequestError(
            f"prompts must be a string, token ids, a prompt dict, or a list of those; got {type(prompts).__name__}"
        )
    items = list(prompts)
    single = _token_ids(items)
    if items and single is not None:
        return [single]  # one prompt given as token ids
    return [_one_prompt(x, f"prompts[{i}]") for i, x in enumerate(items)]
