"""Beam search: vLLM's API (``BeamSearchParams``, ``BeamSearchOutput``) over
transformers' algorithm, run inside the engine.

A beam search is one request of ``beam_width`` sequences in the core: it is
prefilled once; its first token forks it into ``beam_width`` beams that
share the prompt's KV blocks; every step each beam decodes one token in the
batch with the other requests, and :class:`BeamSearch` picks the next beams
from all ``beam_width x vocabulary`` continuations. The core gives each new
beam its parent's blocks (shared) and copies the block two beams would both
write next, so a step costs one decode row per beam, never a recomputed
prefix.

The choice is transformers' ``generate(num_beams=k, do_sample=False,
length_penalty=..., early_stopping=False)``: each step keeps the
``max(2, 1 + n_eos) x k`` best continuations by summed log-probability;
those among the first ``k`` that end in EOS (or reach ``max_tokens``) become
finished hypotheses scored ``sum_logprob / generated_len ** length_penalty``
(the ``k`` best kept); the ``k`` best that do not end continue. The search
stops at ``max_tokens``, when every continuation ends, or when no running
beam can beat the worst of ``k`` finished hypotheses (transformers'
heuristic). The result is the finished hypotheses, best first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spyre_cb.errors import InvalidRequestError

_NEG = -1.0e9  # transformers' "never" score


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters: ``beam_width`` beams, at most ``max_tokens``
    new tokens; ``ignore_eos`` keeps beams going through EOS; ``temperature`` > 0
    ranks continuations by the tempered distribution (0: the model's);
    ``length_penalty`` divides a finished beam's summed log-probability by its
    length to that power."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()  # a bad value is refused where it is written

    def validate(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequestError(f"{name} must be an int >= 1, got {v!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {t!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise InvalidRequestError(f"length_penalty must be a finite number, got {lp!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")


@dataclass
class BeamSearchSequence:
    """One finished beam: ``tokens`` are the prompt's then the generated ones (as
    vLLM gives them), ``logprobs`` the generated tokens' log-probabilities,
    ``score`` what ranks it (``cum_logprob / len(generated) ** length_penalty``)."""

    tokens: list[int]
    output_token_ids: list[int]
    logprobs: list[float]
    cum_logprob: float
    score: float
    finish_reason: str  #: "stop" (it ended with EOS) or "length"
    stop_reason: int | None = None  #: the EOS id it ended with
    text: str | None = None


@dataclass
class BeamSearchOutput:
    """A beam search's result: its best ``beam_width`` sequences, best first."""

    sequences: list[BeamSearchSequence]
    request_id: str = ""


@dataclass
class _Beam:
    tokens: list[int]
    logprobs: list[float]
    score: float  # summed log-probability


@dataclass
class BeamSearch:
    """One request's search state (see the module docs); :meth:`step` takes the
    logits of its beams (one row before the first token) and returns each next
    beam's token and the beam it continues."""

    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    running: list[_Beam] = field(default_factory=list)
    finished: list[tuple[float, _Beam]] = field(default_factory=list)
    done: bool = False
    _improvable: bool = True

    @property
    def started(self) -> bool:
        return bool(self.running)

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """The next beams from ``logits`` [beams, V] (float): their tokens and, for
        each, the index of the beam it continues; sets :attr:`done` when the
        search ends with this step."""
        p = self.params
        k = p.beam_width
        x = logits.float()
        if p.temperature > 0:
            x = x / p.temperature
        logp = torch.log_softmax(x, dim=-1)
        vocab = logp.shape[-1]
        if not self.running:  # the prompt: beam 0 real, the others "never" (as transformers starts)
            running = [_Beam([], [], 0.0)] + [_Beam([], [], _NEG) for _ in range(k - 1)]
            logp = logp[:1].expand(k, vocab)
        else:
            running = self.running
        acc = logp + torch.tensor([b.score for b in running], dtype=logp.dtype)[:, None]
        eos = () if p.ignore_eos else tuple(self.eos_token_ids)
        keep = min(max(2, 1 + len(eos)) * k, k * vocab)
        top_scores, top_idx = acc.reshape(-1).topk(keep)
        t = len(running[0].tokens) + 1  # the length every candidate reaches
        last = t >= p.max_tokens
        cands = []
        for score, idx in zip(top_scores.tolist(), top_idx.tolist(), strict=True):
            parent, token = divmod(idx, vocab)
            hit = last or token in eos
            cands.append((score, parent, token, hit))
        # finished: those of the first k that end, if they may still improve the k best
        if self._improvable:
            penalty = t**p.length_penalty
            for score, parent, token, hit in cands[:k]:
                if hit:
                    b = running[parent]
                    lp = float(logp[parent, token])
                    self.finished.append((score / penalty, _Beam(b.tokens + [token], b.logprobs + [lp], score)))
            self.finished.sort(key=lambda f: -f[0])  # stable: earlier hypotheses first on ties
            del self.finished[k:]
        # running: the k best that do not end
        alive = sorted(cands, key=lambda c: c[0] + (_NEG if c[3] else 0.0), reverse=True)[:k]
        tokens, parents, nxt = [], [], []
        for score, parent, token, hit in alive:
            b = running[parent]
            lp = float(logp[parent, token])
            nxt.append(_Beam(b.tokens + [token], b.logprobs + [lp], score + (_NEG if hit else 0.0)))
            tokens.append(token)
            parents.append(parent)
        self.running = nxt
        # transformers' heuristic: can the best running beam still beat the worst of k finished?
        if len(self.finished) == k:
            best = nxt[0].score / (t**p.length_penalty)
            self._improvable = self._improvable and best > self.finished[-1][0]
        self.done = last or not self._improvable or all(c[3] for c in cands)
        return tokens, parents

    def result(self, prompt: list[int], decode: object = None) -> list[BeamSearchSequence]:
        """The finished beams, best first (with their text when ``decode`` is given)."""
        out = []
        for score, b in self.finished:
            eos = (
                b.tokens[-1] if b.tokens and not self.params.ignore_eos and b.tokens[-1] in self.eos_token_ids else None
            )
            text = decode(b.tokens) if callable(decode) else None
            out.append(
                BeamSearchSequence(
                    tokens=prompt + b.tokens,
                    output_token_ids=list(b.tokens),
                    logprobs=list(b.logprobs),
                    cum_logprob=b.score,
                    score=score,
                    finish_reason="stop" if eos is not None else "length",
                    stop_reason=eos,
                    text=text,
                )
            )
        return out


__all__ = ["BeamSearch", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence"]
