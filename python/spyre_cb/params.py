"""Sampling parameters (no torch here, so the CLI builds its options from them cheaply)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spyre_cb.errors import InvalidRequestError
from spyre_cb.structured import StructuredOutputsParams

#: Temperatures below this are greedy (dividing logits by less overflows), as in vLLM.
MIN_TEMPERATURE = 1e-5

#: Most stop strings one request may give, and the longest one (characters):
#: each is searched in the text of every new token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
#: Largest ``logprobs`` / ``prompt_logprobs`` (alternatives per position), as vLLM's default.
MAX_LOGPROBS = 20
#: ``logit_bias`` values are clamped to this magnitude (as OpenAI's API does).
MAX_LOGIT_BIAS = 100.0

#: ``fn(output_token_ids, logits_row) -> logits_row`` (vLLM's per-request form).
LogitsProcessor = Callable[[list[int], Any], Any]  # (output_token_ids, torch.Tensor) -> torch.Tensor


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
    - ``logit_bias``: ``{token id: bias}`` added to those tokens' logits before
      sampling (clamped to [-100, 100]; 100 at temperature 0 forces the token).
    - ``truncate_prompt_tokens``: keep only the prompt's last k tokens.
    - ``logits_processors``: callables ``fn(output_token_ids, logits) -> logits``.
    - ``structured_outputs``: a :class:`~spyre_cb.StructuredOutputsParams` (JSON
      schema, JSON object, regex, choice or grammar) the output must match; a
      request whose grammar completes finishes with ``"stop"``.
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
    logit_bias: dict[int, float] | None = None
    truncate_prompt_tokens: int | None = None
    logits_processors: list[LogitsProcessor] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    _stop: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        # NumPy integers count as ints (as everywhere else in the API); bools never do
        for name in (
            "n",
            "max_tokens",
            "top_k",
            "seed",
            "logprobs",
            "prompt_logprobs",
            "min_tokens",
            "truncate_prompt_tokens",
        ):
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
        # (dividing logits by a tinier penalty overflows them to infinity)
        number("repetition_penalty", 0.01, 100.0)
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
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        if self.truncate_prompt_tokens is not None and (
            not is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens < 1
        ):
            raise bad(f"truncate_prompt_tokens must be an int >= 1 or None, got {self.truncate_prompt_tokens!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad(f"logit_bias must be a dict {{token id: bias}}, got {type(self.logit_bias).__name__}")
            bias: dict[int, float] = {}
            for t, v in self.logit_bias.items():
                if not is_int(t) or t < 0:
                    raise bad(f"logit_bias keys must be token ids (ints >= 0), got {t!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise bad(f"logit_bias[{t}] must be a finite number, got {v!r}")
                bias[t] = max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(v)))
            self.logit_bias = bias or None
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
        if len(stop) > MAX_STOP_STRINGS:
            raise bad(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted")
        longest = max((len(str(s)) for s in stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise bad(f"a stop string has {longest} characters; at most {MAX_STOP_STRING_CHARS} are accepted")
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
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad(
                    "structured_outputs must be a StructuredOutputsParams, got "
                    f"{type(self.structured_outputs).__name__}"
                )
            self.structured_outputs.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop

    @property
    def processed(self) -> bool:
        """Whether its logits are changed before sampling (penalties, bias, processors)."""
        return self.penalized or bool(self.logit_bias) or bool(self.logits_processors) or self.min_tokens > 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def stop_rule(self, eos_token_ids: frozenset[int] | set[int]) -> StopRule:
        """The token ids that end a request with these parameters on a model with these EOS ids."""
        return StopRule(
            stop_token_ids=tuple(self.stop_token_ids or ()),
            eos_token_ids=() if self.ignore_eos else tuple(sorted(eos_token_ids)),
            min_tokens=self.min_tokens,
        )


@dataclass(frozen=True)
class StopRule:
    """The token ids that end a request: given once to the core (which ends the
    request on them) and read by the sampler (which holds them back until the
    request has ``min_tokens`` tokens)."""

    stop_token_ids: tuple[int, ...] = ()
    #: the model's end-of-sequence ids (empty with ``ignore_eos``)
    eos_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids) | frozenset(self.eos_token_ids)

    def held_back(self, n_generated: int) -> list[int]:
        """The ids the sampler must not pick as token number ``n_generated + 1``."""
        return sorted(self.ids) if n_generated < self.min_tokens else []


__all__ = [
    "SamplingParams",
    "StopRule",
    "LogitsProcessor",
    "MIN_TEMPERATURE",
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_LOGIT_BIAS",
]
