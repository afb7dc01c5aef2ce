"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeds, logprobs)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

from spyre_cb.errors import InvalidRequestError

#: Temperatures below this are greedy (dividing logits by less overflows).
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request (the names vLLM users know).

    ``temperature`` below ``1e-5`` (:data:`MIN_TEMPERATURE`, as in vLLM) is
    greedy, as is ``top_k == 1``. ``seed`` makes a sampled request
    reproducible on its own, whatever else is in the batch. ``stop`` strings
    and ``stop_token_ids`` end a request early (finish reason ``"stop"``), as
    does the model's EOS token unless ``ignore_eos``. ``logprobs=n`` returns
    the top-n log-probabilities of every generated token (plus the chosen one).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    _stop: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        # NumPy integers count as ints (as everywhere else in the API); bools never do
        for name in ("max_tokens", "top_k", "seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bool, int)) and hasattr(value, "__index__"):
                object.__setattr__(self, name, operator.index(value))
        if isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [
                operator.index(t) if not isinstance(t, bool) and hasattr(t, "__index__") else t
                for t in self.stop_token_ids
            ]

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise bad(f"max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad(f"temperature must be a number, got {type(self.temperature).__name__}")
        if isinstance(self.temperature, int) and not -(2**53) < self.temperature < 2**53:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not math.isfinite(self.top_p)
            or not 0 < self.top_p <= 1
        ):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad(f"seed must be in [0, 2**64), got {self.seed}")
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad(
                f"include_stop_str_in_output must be a bool, got {type(self.include_stop_str_in_output).__name__}"
            )
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0
        ):
            raise bad(f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")
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
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
                raise bad(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop


@dataclass
class SampledBatch:
    """One token per row (plan order), and per row the top-n logprobs (with the
    chosen token) or an error: a row that could not be sampled ends its
    request alone."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]
    errors: dict[int, str]


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

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> SampledBatch:
        logits = logits.float()
        best, argmax = logits.max(dim=-1)
        tokens: list[int] = argmax.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(tokens)
        errors: dict[int, str] = {}
        # a row whose best logit is NaN or infinite cannot be sampled
        if not bool(torch.isfinite(best).all()):
            for i in torch.nonzero(~torch.isfinite(best)).flatten().tolist():
                errors[i] = "sampling failed: the model produced NaN or infinite logits"
        for i, (rid, p) in enumerate(zip(request_ids, params)):
            if (p.greedy and p.logprobs is None) or i in errors:
                continue  # the common case: nothing more to do for this row
            try:
                if not p.greedy:
                    tokens[i] = self._sample_row(logits[i], p, self._generators[rid])
            except Exception as e:  # noqa: BLE001 (any failure of this row ends this request only)
                # one request's numbers must not end its batch mates
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                continue
            if p.logprobs is not None:
                logp = torch.log_softmax(logits[i], dim=-1)
                lp: dict[int, float] = {}
                if p.logprobs > 0:
                    vals, idx = logp.topk(min(p.logprobs, logp.numel()))
                    lp = dict(zip(idx.tolist(), vals.tolist()))
                lp[tokens[i]] = float(logp[tokens[i]])
                logprobs[i] = lp
        for i in errors:
            tokens[i] = 0
        return SampledBatch(tokens, logprobs, errors)

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p
            drop = probs.cumsum(dim=-1) - probs >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            row = torch.full_like(row, -math.inf).scatter(0, order, sorted_logits)
        probs = row.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen).item())
