"""Sampling parameters and the batched sampler.

The parameters are vLLM's: greedy or temperature sampling with top-k, top-p
and min-p, seeds, repetition/presence/frequency penalties, min_tokens, stop
conditions, logprobs and prompt logprobs, and per-request logits processors.
Penalties, temperature, top-k, top-p and min-p run as batched tensor ops over
the rows that use them; only each sampled row's random draw (with its own
generator, so a seeded request is reproducible whatever shares its batch) is
taken row by row. Rows under structured outputs get their grammar's token
mask first (one bitmask filled for those rows only, applied in one op); each
one's matcher then takes the sampled token before the commit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from spyre_cb.outputs import Logprob, PositionLogprobs
from spyre_cb.params import MIN_TEMPERATURE, LogitsProcessor, SamplingParams, StopRule


class SamplingRow(Protocol):
    """What the sampler reads of a request (the engine's RequestState)."""

    request_id: str
    params: SamplingParams
    stop_rule: StopRule
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
    #: per row, whether its request stops here on something only text shows (a stop
    #: string; a failed row too), set before the commit
    stopped: list[bool] = field(default_factory=list)
    #: rows whose structured-output grammar ended with this token (the request stops here)
    grammar_ended: set[int] = field(default_factory=set)


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
        #: structured-output matchers (xgrammar GrammarMatcher) of the requests that have one
        self._matchers: dict[str, Any] = {}

    def start(self, request_id: str, params: SamplingParams, default_seed: int, matcher: Any = None) -> None:
        if not params.greedy:
            seed = params.seed if params.seed is not None else default_seed
            self._generators[request_id] = torch.Generator().manual_seed(seed)
        if matcher is not None:
            self._matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._matchers.pop(request_id, None)

    def _apply_grammars(
        self, raw: torch.Tensor, rows: Sequence[SamplingRow], cons: list[int], errors: dict[int, str]
    ) -> torch.Tensor:
        """The working copy of ``raw`` with each constrained row's disallowed tokens at -inf: one
        bitmask filled by their matchers, unpacked and applied in one op each. A matcher that
        fails fails its row only."""
        n, vocab = raw.shape
        bitmask = torch.full((len(cons), (vocab + 31) // 32), -1, dtype=torch.int32)
        for j, i in enumerate(cons):
            try:
                self._matchers[rows[i].request_id].fill_next_token_bitmask(bitmask, j)
            except Exception as e:  # noqa: BLE001 (a failing matcher ends its request alone)
                errors[i] = f"structured output failed: {type(e).__name__}: {e}"
                bitmask[j] = -1
        # bit t % 32 of word t // 32 allows token t (little-endian words, whatever the host's order)
        words = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
        allowed = torch.from_numpy(np.unpackbits(words, axis=-1, count=vocab, bitorder="little").view(np.bool_))
        if len(cons) == n:  # the masked copy is the working copy
            return torch.where(allowed, raw, _NEG_INF)
        work = raw.clone()
        work[cons] = torch.where(allowed, raw[cons], _NEG_INF)
        return work

    def _advance(
        self, rows: Sequence[SamplingRow], cons: list[int], tokens: list[int], errors: dict[int, str]
    ) -> set[int]:
        """Each constrained row's matcher takes its sampled token; returns the rows whose
        grammar ended with it (a stop token accepted after a complete output)."""
        ended: set[int] = set()
        for i in cons:
            if i in errors:
                continue
            m = self._matchers[rows[i].request_id]
            try:
                if not m.accept_token(tokens[i]):
                    errors[i] = f"structured output failed: the grammar does not accept token {tokens[i]}"
                elif m.is_terminated():
                    ended.add(i)
            except Exception as e:  # noqa: BLE001 (a failing matcher ends its request alone)
                errors[i] = f"structured output failed: {type(e).__name__}: {e}"
        return ended

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampledBatch:
        """One token per row; a row's stop rule (the one the core applies) holds
        its stop ids back until it has ``min_tokens`` tokens."""
        raw = logits.float()
        n = len(rows)
        params = [r.params for r in rows]
        errors: dict[int, str] = {}
        greedy = [p.greedy for p in params]
        # rows under structured outputs: their grammar's mask comes first, in one op
        cons = [i for i, r in enumerate(rows) if r.request_id in self._matchers] if self._matchers else []
        # (a row's stop rule holds ids back only below min_tokens, which its params carry too)
        simple = not cons and all(greedy) and not any(p.processed for p in params)
        if cons:
            work = self._apply_grammars(raw, rows, cons, errors)
        else:
            work = raw if simple else raw.clone()
        if not simple:
            for i, r in enumerate(rows):
                p = r.params
                try:
                    for fn in p.logits_processors or ():
                        work[i] = fn(list(r.output_token_ids), work[i])
                except Exception as e:  # noqa: BLE001 (a user's processor fails: that request ends alone)
                    errors[i] = f"logits processor failed: {type(e).__name__}: {e}"
                if p.logit_bias:
                    ids = list(p.logit_bias)
                    if max(ids) >= work.shape[-1]:
                        errors[i] = f"logit_bias names token {max(ids)}, outside the vocabulary of {work.shape[-1]}"
                    else:
                        work[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=work.dtype)
                held = r.stop_rule.held_back(len(r.output_token_ids))
                if held:
                    work[i, held] = -math.inf
            _apply_penalties(work, rows)
        best, argmax = work.max(dim=-1)
        tokens: list[int] = argmax.tolist()
        # a row whose best logit is NaN or infinite cannot be sampled (checked
        # on the Python floats: cheaper than two more tensor ops per step)
        bests = best.tolist()
        for i, b in enumerate(bests if not math.isfinite(sum(bests)) else ()):
            if not math.isfinite(b):
                why = "the model produced NaN or infinite logits"
                if not simple and bool(torch.isfinite(raw[i]).all()):
                    why = "its penalties, logit bias or logits processors made the logits NaN or infinite"
                    if i in cons:
                        why = "its structured output grammar allows no token the model can give here"
                errors.setdefault(i, f"sampling failed: {why}")
        sampled = [] if simple else [i for i, g in enumerate(greedy) if not g and i not in errors]
        if sampled:
            probs = _filtered_probs(work[sampled], [params[i] for i in sampled])
            for row, i in enumerate(sampled):
                try:
                    gen = self._generators[rows[i].request_id]
                    tokens[i] = int(torch.multinomial(probs[row], 1, generator=gen).item())
                except Exception as e:  # noqa: BLE001 (any failure of this row ends this request only)
                    errors[i] = f"sampling failed: {type(e).__name__}: {e}"
        ended = self._advance(rows, cons, tokens, errors) if cons else set()
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
        return SampledBatch(tokens, logprobs, errors, grammar_ended=ended)


_NEG_INF = torch.tensor(-math.inf)


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
