"""Sampling parameters and the batched sampler.

The parameters are vLLM's: greedy or temperature sampling with top-k, top-p
and min-p, seeds, repetition/presence/frequency penalties, min_tokens, stop
conditions, logprobs and prompt logprobs, and per-request logits processors.
Penalties, temperature, top-k, top-p and min-p run as batched tensor ops over
the rows that use them; only each sampled row's random draw (with its own
generator, so a seeded request is reproducible whatever shares its batch) is
taken row by row.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from spyre_cb.errors import InvalidRequestError
from spyre_cb.outputs import Logprob, PositionLogprobs

#: Temperatures below this are greedy (dividing logits by less overflows), as in vLLM.
MIN_TEMPERATURE = 1e-5

#: ``fn(output_token_ids, logits_row) -> logits_row`` (vLLM's per-request form).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to pick tokens for one request (the names and meanings vLLM users know).

    - ``n``: completions per prompt (``LLM.generate`` returns them together).
    - ``max_tokens``: at most this many new tokens; ``None`` = up to ``max_model_len``.
    - ``temperature`` below ``1e-5`` (``0`` included) or ``top_k == 1`` is greedy.
      ``top_k`` (0 = off), ``top_p`` and ``min_p`` (0 = off) restrict sampling.
    - ``seed`` makes a sampled request reproducible whatever shares its batch.
    - ``repetition_penalty`` (>1 discourages tokens of the prompt and the
      output, as transformers does), ``presence_penalty`` and
      ``frequency_penalty`` (subtracted per output token seen / per occurrence).
    - ``min_tokens``: EOS and ``stop_token_ids`` cannot end the request before this many tokens.
    - ``stop`` strings and ``stop_token_ids`` end a request early (finish reason
      ``"stop"``), as does any EOS id of the model unless ``ignore_eos``.
    - ``logprobs=k``: the top-k log-probabilities of every generated token (plus
      the chosen one); ``prompt_logprobs=k`` the same for the prompt tokens.
    - ``skip_special_tokens``: leave special tokens out of the output text.
    - ``logits_processors``: callables ``fn(output_token_ids, logits) -> logits``.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    _stop: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        # NumPy integers count as ints (as everywhere else in the API); bools never do
        for name in ("n", "max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "min_tokens"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
                object.__setattr__(self, name, operator.index(value))
        if isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [
                operator.index(t) if not isinstance(t, bool) and hasattr(t, "__index__") else t
                for t in self.stop_token_ids
            ]

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(f"{name} must be a number, got {type(v).__name__}")
            if isinstance(v, int) and not -(2**53) < v < 2**53:
                raise bad(f"{name} must be a finite number, got {v}")
            ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok and hi == math.inf:
                raise bad(f"{name} must be a finite number {'>' if lo_open else '>='} {lo:g}, got {v!r}")
            if not ok:
                raise bad(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")

        if not is_int(self.n) or self.n < 1:
            raise bad(f"n must be an int >= 1, got {self.n!r}")
        if self.max_tokens is not None:
            if not is_int(self.max_tokens):
                raise bad(f"max_tokens must be an int or None, got {type(self.max_tokens).__name__}")
            if self.max_tokens < 1:
                raise bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        number("temperature", 0.0)
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, lo_open=True)
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens {self.min_tokens} is larger than max_tokens {self.max_tokens}")
        if self.seed is not None and not is_int(self.seed):
            raise bad(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise bad(f"{name} must be an int >= 0 or None, got {v!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        stop: tuple[object, ...]
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            stop = tuple(self.stop)
        else:
            raise bad(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if not all(isinstance(s, str) and s for s in stop):
            raise bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self._stop = tuple(str(s) for s in stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
                raise bad(f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}")
            if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise bad(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        if self.logits_processors is not None and (
            not isinstance(self.logits_processors, (list, tuple))
            or not all(callable(f) for f in self.logits_processors)
        ):
            raise bad("logits_processors must be a list of callables fn(output_token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class SamplingRow(Protocol):
    """What the sampler reads of a request (the engine's RequestState)."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SampledBatch:
    """One token per row (plan order), and per row the top-n logprobs of the
    model's distribution (with the chosen token) or an error: a row that could
    not be sampled ends its request alone."""

    tokens: list[int]
    logprobs: list[PositionLogprobs | None]
    errors: dict[int, str]


def top_logprobs(logp: torch.Tensor, k: int, chosen: Sequence[int | None]) -> list[PositionLogprobs]:
    """Per row of ``logp`` [R, V]: the top-k entries plus the chosen token's, with ranks."""
    out: list[PositionLogprobs] = []
    if k > 0:
        vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        rows = [
            {t: Logprob(v, rank + 1) for rank, (t, v) in enumerate(zip(i, vs))}
            for i, vs in zip(idx.tolist(), vals.tolist())
        ]
    else:
        rows = [{} for _ in range(logp.shape[0])]
    for r, (d, t) in enumerate(zip(rows, chosen)):
        if t is not None and t not in d:
            v = logp[r, t]
            d[t] = Logprob(float(v), int((logp[r] > v).sum()) + 1)
        out.append(d)
    return out


class Sampler:
    """Picks one token per row of logits, each row with its own parameters."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def start(self, request_id: str, params: SamplingParams, default_seed: int) -> None:
        if not params.greedy:
            seed = params.seed if params.seed is not None else default_seed
            self._generators[request_id] = torch.Generator().manual_seed(seed)

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow], stop_ids: frozenset[int]) -> SampledBatch:
        """``stop_ids``: the model's EOS ids (held back by ``min_tokens``)."""
        raw = logits.float()
        n = len(rows)
        params = [r.params for r in rows]
        errors: dict[int, str] = {}
        simple = all(p.greedy and not p.penalized and not p.logits_processors and not p.min_tokens for p in params)
        work = raw if simple else raw.clone()
        if not simple:
            for i, r in enumerate(rows):
                p = r.params
                try:
                    for fn in p.logits_processors or ():
                        work[i] = fn(list(r.output_token_ids), work[i])
                except Exception as e:  # noqa: BLE001 (a user's processor fails: that request ends alone)
                    errors[i] = f"logits processor failed: {type(e).__name__}: {e}"
                if len(r.output_token_ids) < p.min_tokens:
                    held = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(stop_ids))
                    if held:
                        work[i, sorted(held)] = -math.inf
            _apply_penalties(work, rows)
        best, argmax = work.max(dim=-1)
        tokens: list[int] = argmax.tolist()
        # a row whose best logit is NaN or infinite cannot be sampled
        if not bool(torch.isfinite(best).all()):
            for i in torch.nonzero(~torch.isfinite(best)).flatten().tolist():
                errors.setdefault(i, "sampling failed: the model produced NaN or infinite logits")
        sampled = [i for i, p in enumerate(params) if not p.greedy and i not in errors]
        if sampled:
            probs = _filtered_probs(work[sampled], [params[i] for i in sampled])
            for row, i in enumerate(sampled):
                try:
                    gen = self._generators[rows[i].request_id]
                    tokens[i] = int(torch.multinomial(probs[row], 1, generator=gen).item())
                except Exception as e:  # noqa: BLE001 (any failure of this row ends this request only)
                    errors[i] = f"sampling failed: {type(e).__name__}: {e}"
        logprobs: list[PositionLogprobs | None] = [None] * n
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None and i not in errors]
        if wanted:
            logp = torch.log_softmax(raw[wanted], dim=-1)  # the model's own distribution, as vLLM reports it
            for k in sorted({params[i].logprobs or 0 for i in wanted}):
                rows_k = [j for j, i in enumerate(wanted) if (params[i].logprobs or 0) == k]
                tops = top_logprobs(logp[rows_k], k, [tokens[wanted[j]] for j in rows_k])
                for j, d in zip(rows_k, tops):
                    logprobs[wanted[j]] = d
        for i in errors:
            tokens[i] = 0
        return SampledBatch(tokens, logprobs, errors)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (over prompt and output, as transformers does), presence and
    frequency (over the output, as vLLM does) penalties, batched over the rows that use them."""
    idx = [i for i, r in enumerate(rows) if r.params.penalized]
    if not idx:
        return
    vocab = logits.shape[-1]
    sub = logits[idx]
    counts = torch.zeros(len(idx), vocab, dtype=sub.dtype)
    seen = torch.zeros(len(idx), vocab, dtype=torch.bool)
    for j, i in enumerate(idx):
        out = rows[i].output_token_ids
        if out:
            counts[j].index_add_(0, torch.tensor(out, dtype=torch.long), torch.ones(len(out), dtype=sub.dtype))
        seen[j, rows[i].prompt_token_ids] = True
    seen |= counts > 0
    rep = torch.tensor([rows[i].params.repetition_penalty for i in idx], dtype=sub.dtype)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], dtype=sub.dtype)[:, None]
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx], dtype=sub.dtype)[:, None]
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[idx] = sub


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, batched; returns probabilities."""
    vocab = logits.shape[-1]
    temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    logits = logits / temp
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    ps = torch.tensor([p.top_p for p in params], dtype=logits.dtype)[:, None]
    if bool((ks < vocab).any()) or bool((ps < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab)[None, :]
        drop = rank >= ks[:, None]
        probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p
        drop |= (probs.cumsum(dim=-1) - probs) >= ps
        drop[:, 0] = False  # the most likely token always stays
        logits = torch.full_like(logits, -math.inf).scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)
    mins = torch.tensor([p.min_p for p in params], dtype=logits.dtype)[:, None]
    if bool((mins > 0).any()):
        probs = probs.masked_fill(probs < mins * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


__all__ = ["SamplingParams", "Sampler", "SampledBatch", "LogitsProcessor", "MIN_TEMPERATURE", "top_logprobs"]
