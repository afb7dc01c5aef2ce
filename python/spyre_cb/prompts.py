"""Prompts in any of vLLM's forms, as ``LLM`` and ``Embedder`` take them: a
string, token ids (ints or NumPy integers, a list or an array), ``{"prompt":
str}`` or ``{"prompt_token_ids": [...]}``, or a list of those."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from spyre_cb.errors import InvalidRequestError

PromptLike = str | Sequence[int]


def token_ids(x: object) -> list[int] | None:
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


def one_prompt(x: object, where: str) -> PromptLike:
    """One prompt in any of vLLM's forms: a str, token ids, ``{"prompt": str}``
    or ``{"prompt_token_ids": [...]}``."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        if set(x) == {"prompt"} and isinstance(x["prompt"], str):
            return x["prompt"]
        if set(x) == {"prompt_token_ids"}:
            ids = token_ids(x["prompt_token_ids"])
            if ids is not None:
                return ids
        raise InvalidRequestError(
            f"{where}: a prompt dict is {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, got keys {sorted(x)}"
        )
    ids = token_ids(x)
    if ids is None:
        raise InvalidRequestError(
            f"{where} must be a string, a list of token ids, or a prompt dict, got {type(x).__name__}"
        )
    return ids


def as_batch(prompts: object) -> list[PromptLike]:
    """One prompt or a list of them, as a list."""
    if isinstance(prompts, (str, dict)):
        return [one_prompt(prompts, "prompt")]
    if not isinstance(prompts, Iterable):
        raise InvalidRequestError(
            f"prompts must be a string, token ids, a prompt dict, or a list of those; got {type(prompts).__name__}"
        )
    items = list(prompts)
    single = token_ids(items)
    if items and single is not None:
        return [single]  # one prompt given as token ids
    return [one_prompt(x, f"prompts[{i}]") for i, x in enumerate(items)]


def checked_token_ids(ids: object, vocab_size: int, what: str = "prompt_token_ids") -> list[int]:
    """``ids`` as a list of ints (NumPy integers taken), each in the vocabulary;
    an InvalidRequestError names ``what`` and the position otherwise."""
    if isinstance(ids, (str, bytes)):
        raise InvalidRequestError(f"{what} must be a sequence of ints, got str")
    if not isinstance(ids, Iterable):
        raise InvalidRequestError(f"{what} must be a sequence of ints, got {type(ids).__name__}")
    out = list(ids)
    for i, t in enumerate(out):
        try:
            if isinstance(t, bool):
                raise TypeError
            out[i] = t = operator.index(t)  # int, numpy integer, ...
        except TypeError:
            raise InvalidRequestError(f"{what}[{i}] must be an int, got {type(t).__name__}") from None
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{what}[{i}] = {t} is outside the model's vocabulary (ids 0..{vocab_size - 1})")
    return out


__all__ = ["PromptLike", "as_batch", "checked_token_ids", "one_prompt", "token_ids"]
