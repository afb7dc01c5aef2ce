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
class RequestMetrics:
    """When a request went through the engine (``time.time()`` seconds)."""

    arrival_time: float
    first_scheduled_time: float | None = None  #: its prefill step started
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    n_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to its prefill."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def mean_inter_token_latency(self) -> float | None:
        """Mean seconds between consecutive tokens (None below two tokens)."""
        if self.n_tokens < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.n_tokens - 1)


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
    metrics: RequestMetrics | None = None
