"""Request outputs in the shapes vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability under the model, its rank (1 = most likely)
    and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per position: token id -> Logprob (the top-k, plus the chosen token).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  #: sum of the chosen tokens' logprobs (when logprobs were asked)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  #: "length", "stop" or "abort"
    stop_reason: int | str | None = None  #: the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None  #: None for the first prompt token
