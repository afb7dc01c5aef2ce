"""The pieces of OpenAI response bodies built from engine outputs: choices,
usage, and logprobs in the three shapes clients read — the legacy
completions shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``), the chat shape (``content[]`` with ``token``, ``logprob``,
``bytes``, ``top_logprobs``) and vLLM's ``prompt_logprobs``.

Logprobs are those of the model's own distribution (before penalties, logit
bias or sampling filters), as vLLM reports them by default.
"""

from __future__ import annotations

import math
from typing import Any

from spyre_cb.outputs import Logprob, PositionLogprobs

#: JSON has no -inf: a token the model rules out is reported with this logprob (as vLLM does).
NEG_INF_LOGPROB = -9999.0


def usage(prompt_tokens: int, n_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens}


def _lp(x: float) -> float:
    return x if math.isfinite(x) else NEG_INF_LOGPROB


def _token_text(entry: Logprob | None, token: int, decode: Any) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return str(decode([token]))


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object, built token by token (so a
    stream can send each chunk's part with offsets into the whole text)."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.offset = 0

    def part(
        self, token_ids: list[int], positions: list[PositionLogprobs | None], first_is_none: bool = False
    ) -> dict[str, Any]:
        """``token_ids`` with their positions' logprobs; ``first_is_none``: the
        prompt's first token (no logprob: nothing comes before it)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for i, (t, pos) in enumerate(zip(token_ids, positions)):
            entry = pos.get(t) if pos is not None else None
            text = _token_text(entry, t, self.decode)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if (i == 0 and first_is_none) or pos is None or entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            token_logprobs.append(_lp(entry.logprob))
            tops.append({_token_text(e, k, self.decode): _lp(e.logprob) for k, e in pos.items()})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], top: int, decode: Any
) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` entries: each chosen token with its logprob and
    the ``top`` most likely tokens of its position (by rank)."""
    out = []
    for t, pos in zip(token_ids, positions):
        entry = pos.get(t)
        text = _token_text(entry, t, decode)
        best = sorted(((e.rank or 0, k, e) for k, e in pos.items() if e.rank is not None and e.rank <= top))
        out.append(
            {
                "token": text,
                "logprob": _lp(entry.logprob) if entry is not None else NEG_INF_LOGPROB,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (s := _token_text(e, k, decode)),
                        "logprob": _lp(e.logprob),
                        "bytes": list(s.encode("utf-8")),
                    }
                    for _, k, e in best
                ],
            }
        )
    return out


def prompt_logprobs_json(positions: list[PositionLogprobs | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token ``{token id: {logprob, rank, decoded_token}}`` (None first)."""
    if positions is None:
        return None
    return [
        None
        if pos is None
        else {
            str(k): {"logprob": _lp(e.logprob), "rank": e.rank, "decoded_token": e.decoded_token}
            for k, e in pos.items()
        }
        for pos in positions
    ]


__all__ = [
    "usage",
    "CompletionLogprobs",
    "merge_completion_logprobs",
    "chat_logprobs",
    "prompt_logprobs_json",
    "NEG_INF_LOGPROB",
]
