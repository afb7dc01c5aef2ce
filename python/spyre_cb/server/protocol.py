"""The OpenAI request bodies (pydantic) and their conversion into what the
engine runs: prompt token ids and validated ``SamplingParams``."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spyre_cb.errors import SpyreCBError
from spyre_cb.sampling import SamplingParams
from spyre_cb.server.errors import APIError

# ----- request bodies -------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def params(self, default_max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


# ----- bodies into prompts and SamplingParams ------------------------------------------


def sampling_params(body: _Sampling, default_max: int | None, n_index: int) -> SamplingParams:
    """The validated params of choice ``n_index`` (with ``n > 1`` a seed moves by the index)."""
    try:
        p = body.params(default_max)
        if body.n > 1 and p.seed is not None:
            p = dataclasses.replace(p, seed=p.seed + n_index)
        p.validate()
        return p
    except SpyreCBError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


def completion_prompts(body: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """The token ids of each prompt: a text, a list of texts, ids, or a list of id lists."""
    p = body.prompt
    if isinstance(p, str):
        return [_encode(tokenizer, p)]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    out = []
    for x in p:
        out.append(_encode(tokenizer, x) if isinstance(x, str) else list(x))  # type: ignore[arg-type]
    if not out:
        raise APIError(400, "prompt must not be empty", "invalid_request_error", "prompt")
    return out


def chat_prompt(body: ChatRequest, tokenizer: Any) -> list[int]:
    """The messages through the tokenizer's chat template, with the generation prompt."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model's tokenizer has no chat template", "invalid_request_error", "messages")
    msgs = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    except Exception as e:
        raise APIError(400, f"could not apply the chat template: {e}", "invalid_request_error", "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _encode(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send prompt token ids", "invalid_request_error", "prompt")
    return list(tokenizer(text).input_ids)


__all__ = [
    "StreamOptions",
    "CompletionRequest",
    "ChatMessage",
    "ChatRequest",
    "sampling_params",
    "completion_prompts",
    "chat_prompt",
]
