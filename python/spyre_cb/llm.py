"""``LLM``: offline batch generation on top of the engine (vLLM's shape)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

from spyre_cb.beam_search import BeamSearchOutput, BeamSearchParams
from spyre_cb.checkpoint import ENCODER_ARCHITECTURES
from spyre_cb.config import EngineConfig
from spyre_cb.embedding import Embedder, EmbeddingOutput, is_embedding_model
from spyre_cb.engine import Engine, check_text
from spyre_cb.errors import InvalidRequestError, UnknownRequestError
from spyre_cb.outputs import CompletionOutput, RequestOutput
from spyre_cb.prompts import PromptLike, as_batch
from spyre_cb.sampling import SamplingParams


class LLM:
    """Continuous-batching generation over an FMS model.

    ``LLM(model="tiny", config=None, **options)``: ``model`` is a Hugging Face
    checkpoint directory, or ``"tiny"`` for the offline random-weight test
    model (built once into ``$SPYRE_CB_CACHE`` or ``~/.cache/spyre_cb``); the
    options are the fields of :class:`~spyre_cb.config.EngineConfig`.
    """

    def __init__(
        self, model: str | os.PathLike[str] | None = None, config: EngineConfig | None = None, **options: Any
    ) -> None:
        self._engine: Engine | None = None
        #: the encoder, when the model is an embedding model (``LLM.embed``)
        self.embedder: Embedder | None = None
        if _is_encoder(model, config, options):
            self.embedder = Embedder(model, config, **options)
        else:
            # the engine resolves the model ("tiny", a directory, or the config's) and the options
            self._engine = Engine(model, config, **options)
        self._ids = itertools.count()

    @property
    def engine(self) -> Engine:
        """The generation engine (an InvalidRequestError for an embedding model)."""
        if self._engine is None:
            assert self.embedder is not None
            raise InvalidRequestError(
                f"{self.embedder.architecture} is an embedding model: it has no generation; use LLM.embed"
            )
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.embedder.tokenizer if self.embedder is not None else self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        """The checkpoint's tokenizer (a transformers tokenizer), as vLLM's ``LLM.get_tokenizer()``."""
        return self.tokenizer

    def embed(
        self, prompts: PromptLike | Sequence[PromptLike], *, dimensions: int | None = None
    ) -> list[EmbeddingOutput]:
        """One embedding per prompt (a string or token ids), in order, as vLLM's
        ``LLM.embed``: ``out[i].outputs.embedding``. Needs an embedding model
        (an encoder checkpoint: ``LLM("tiny-embed")``)."""
        if self.embedder is None:
            raise InvalidRequestError(
                "this model is generative: LLM.embed needs an embedding model (an encoder checkpoint, "
                f"architectures {', '.join(ENCODER_ARCHITECTURES)})"
            )
        return self.embedder.embed(prompts, dimensions=dimensions)

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; outputs in input order, ``n`` completions each.

        A prompt is a string, token ids, ``{"prompt": str}`` or
        ``{"prompt_token_ids": [...]}``; give one SamplingParams or one per prompt.
        """
        batch = as_batch(prompts)
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
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise InvalidRequestError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        groups: list[list[str]] = []  # per prompt: the engine requests of its n completions
        jobs: list[tuple[str, Callable[[str], object]]] = []
        for prompt, p in zip(batch, params):
            rid = f"llm-{next(self._ids)}"
            group = []
            for k, sub in enumerate(_fan_out(p)):
                sub_id = rid if p.n == 1 else f"{rid}#{k}"
                if isinstance(prompt, str):
                    jobs.append((sub_id, functools.partial(self._add_text, prompt=prompt, params=sub)))
                else:
                    jobs.append((sub_id, functools.partial(self._add_ids, prompt=list(prompt), params=sub)))
                group.append(sub_id)
            groups.append(group)
        self._queue_and_run(jobs, use_tqdm)
        return [self._output(group) for group in groups]

    def beam_search(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over every prompt (vLLM's ``LLM.beam_search``): one
        :class:`~spyre_cb.beam_search.BeamSearchOutput` per prompt, in input order,
        its ``beam_width`` sequences best first. The searches run in the engine,
        batched together (see :mod:`spyre_cb.beam_search`)."""
        batch = as_batch(prompts)
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        jobs: list[tuple[str, Callable[[str], object]]] = []
        for prompt in batch:
            rid = f"beam-{next(self._ids)}"
            ids = None if isinstance(prompt, str) else list(prompt)
            text = prompt if isinstance(prompt, str) else None
            jobs.append((rid, functools.partial(self._add_beams, ids=ids, text=text, params=params)))
        self._queue_and_run(jobs, use_tqdm)
        return [BeamSearchOutput(self.engine.beam_result(self.engine.release(rid)), rid) for rid, _ in jobs]

    def _add_text(self, rid: str, prompt: str, params: SamplingParams) -> object:
        return self.engine.add_request(rid, sampling_params=params, prompt=prompt)

    def _add_ids(self, rid: str, prompt: list[int], params: SamplingParams) -> object:
        return self.engine.add_request(rid, prompt, params)

    def _add_beams(self, rid: str, ids: list[int] | None, text: str | None, params: BeamSearchParams) -> object:
        return self.engine.add_beam_search(rid, ids, params, prompt=text)

    def _queue_and_run(self, jobs: list[tuple[str, Callable[[str], object]]], use_tqdm: bool) -> None:
        """Queues every job (all or nothing: a refused one takes back the others),
        then steps until they all finish; interrupted or failed, takes them back
        so the next call does not compute them silently."""
        ids: list[str] = []
        try:
            for rid, add in jobs:
                add(rid)
                ids.append(rid)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
                self.engine.release(rid)
            raise
        try:
            self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                try:
                    self.engine.abort_request(rid)
                except UnknownRequestError:
                    pass  # finished (or already ended by the failed step)
                self.engine.release(rid)
            raise

    def chat(
        self,
        messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to conversations (lists of ``{"role", "content"}``),
        rendered with the tokenizer's chat template, as vLLM's ``LLM.chat``."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template: use generate() with a prompt")
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        prompts: list[PromptLike] = []
        for i, conv in enumerate(conversations):
            if not isinstance(conv, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in conv
            ):
                raise InvalidRequestError(
                    f"conversation {i} must be a list of {{'role': str, 'content': str}} messages"
                )
            for m in conv:
                check_text(m["content"], f"conversation {i}: a message's content")
            try:
                ids = tok.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt, tokenize=True)
            except Exception as e:  # noqa: BLE001 (a template error is the caller's input)
                raise InvalidRequestError(
                    f"conversation {i}: the chat template failed: {type(e).__name__}: {e}"
                ) from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append(list(ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        mine = set(ids)
        left = set(ids)
        with tqdm(total=len(ids), desc="generate", unit="seq", disable=not use_tqdm) as bar:
            while left:
                for out in self.engine.step():
                    if out.finished and out.request_id in mine:
                        left.discard(out.request_id)
                        bar.update(1)

    def _output(self, group: list[str]) -> RequestOutput:
        states = [self.engine.release(rid) for rid in group]
        comps = [
            CompletionOutput(
                k,
                s.output_text(self.engine.tokenizer),
                list(s.output_token_ids),
                s.cumulative_logprob,
                s.logprobs,
                s.finish_reason,
                s.stop_reason,
            )
            for k, s in enumerate(states)
        ]
        first = states[0]
        rid = group[0].split("#")[0]
        return RequestOutput(
            rid, first.prompt, list(first.prompt_token_ids), comps, True, first.prompt_logprobs, first.metrics
        )


def _is_encoder(model: object, config: EngineConfig | None, options: dict[str, Any]) -> bool:
    """Whether the model the arguments name is an embedding model (bad arguments are
    left for the engine to report)."""
    try:
        kw = dict(options)
        if model is not None:
            kw["model"] = os.fspath(model)  # type: ignore[call-overload]
        return is_embedding_model(EngineConfig.from_kwargs(config, **kw))
    except Exception:  # noqa: BLE001
        return False


def _fan_out(p: SamplingParams) -> list[SamplingParams]:
    """The n completions of one prompt as n single requests; seeded ones get
    seeds seed, seed + 1, ... so that each is reproducible and they differ."""
    if p.n == 1:
        return [p]
    return [dataclasses.replace(p, n=1, seed=None if p.seed is None else (p.seed + k) % 2**64) for k in range(p.n)]
