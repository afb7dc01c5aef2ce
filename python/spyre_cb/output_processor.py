"""Output processing: what a sampled token becomes for its request.

The engine's step commits tokens in the core; everything a token then means
for its request lives here: stop strings (checked before the commit, so the
core ends the request), the output token list, per-request metrics, logprobs
with their decoded text, incremental text deltas that never show part of a
stop string, and the final outputs of ended requests. No scheduling state:
the core decides which tokens end a request and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from spyre_cb._core import StopStringMatcher
from spyre_cb.beam_search import BeamSearch, BeamSearchSequence
from spyre_cb.detokenizer import IncrementalDetokenizer
from spyre_cb.outputs import PositionLogprobs, RequestMetrics
from spyre_cb.params import SamplingParams, StopRule
from spyre_cb.sampling import SampledBatch, top_logprobs


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  #: "length", "stop" or "abort" once finished
    stop_reason: int | str | None = None  #: the stop token id or string, if any
    logprobs: list[PositionLogprobs] | None = None
    error: str | None = None  #: why an aborted request was aborted by the engine
    #: the text these tokens add, with ``Engine.stream_text`` (never part of a stop
    #: string; on the final output, whatever was held back)
    text: str | None = None
    #: on a request's first output, when it asked for ``prompt_logprobs``: one
    #: entry per prompt token (None for the first)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    #: on a beam search's final output: its finished beams, best first
    #: (``new_token_ids`` are the best one's)
    beams: list[BeamSearchSequence] | None = None


@dataclass
class RequestState:
    """Everything the engine knows about one request (prompt, output so far)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    #: the ids that end it (the core applies the same rule; the sampler holds
    #: them back until ``min_tokens``)
    stop_rule: StopRule = field(default_factory=StopRule)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    #: the engine's step count when it was queued: the first step it could run in
    arrival_step: int = -1
    #: made on first use, for requests with stop strings or streamed text
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    #: output tokens the detokenizer has seen, and characters of text streamed so far
    n_detokenized: int = field(default=0, repr=False)
    n_streamed_chars: int = field(default=0, repr=False)
    #: made on first use, for requests with stop strings: matched as the text grows
    stop_matcher: StopStringMatcher | None = field(default=None, repr=False)
    #: a beam search's state (None for every other request)
    beam: BeamSearch | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output_text(self, tokenizer: Any) -> str:
        """Generated text (cut before a matched stop string)."""
        if self.stop_reason is not None and isinstance(self.stop_reason, str):
            return self.text
        if tokenizer is None:
            return ""
        text: str = tokenizer.decode(self.output_token_ids, skip_special_tokens=self.params.skip_special_tokens)
        return text


class OutputProcessor:
    """Turns committed tokens into request state and step outputs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        #: give every StepOutput its text delta (incremental detokenization;
        #: off by default: LLM decodes once at the end)
        self.stream_text = False

    # ----- before the commit --------------------------------------------------

    def stop_strings(self, states: list[RequestState], sampled: SampledBatch) -> list[bool]:
        """Per sampled row: whether its request stops on something only text shows
        (a stop string), its structured-output grammar ended, or its row failed (it
        stops too; the core then ends it)."""
        errors, ended = sampled.errors, sampled.grammar_ended
        if not errors and not ended and not any(s.params.stop_strings for s in states):
            return []  # nothing stops on text: the core takes no flags as all False
        return [
            i in errors or i in ended or (bool(s.params.stop_strings) and self.stop_string(s, t))
            for i, (s, t) in enumerate(zip(states, sampled.tokens))
        ]

    def stop_string(self, s: RequestState, token: int) -> bool:
        """Whether the text now contains one of the request's stop strings (decided
        before the commit; stop ids, EOS and max_tokens are the core's to check).
        The core's matcher keeps each stop string's state across steps: a step
        costs O(stop strings x new characters), whatever their lengths."""
        p = s.params
        if p.stop_strings and self.tokenizer is not None:
            detok = self._detokenizer(s)
            before = len(detok.text)
            detok.push(token)  # O(1) per token, not a decode of the whole output
            s.n_detokenized += 1
            text = detok.text
            if s.stop_matcher is None:
                s.stop_matcher = StopStringMatcher(list(p.stop_strings))
            found = s.stop_matcher.feed(text[before:])
            if found is not None:
                index, at = found
                stop = p.stop_strings[index]
                s.text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                s.stop_reason = stop
                return True
            s.text = text
        return False

    def prompt_logprobs(self, s: RequestState, logits: Any, first: int) -> list[PositionLogprobs | None]:
        """Logprobs of prompt tokens ``first..`` from the logits of the positions before them."""
        import torch

        k = s.params.prompt_logprobs or 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        out: list[PositionLogprobs | None] = []
        for d in top_logprobs(logp, k, s.prompt_token_ids[first : first + logits.shape[0]]):
            self._decode_tokens(d)
            out.append(d)
        return out

    # ----- after the commit ---------------------------------------------------

    def emit(
        self,
        states: list[RequestState],
        sampled: SampledBatch,
        finished: dict[str, tuple[str, int | None]],
        aborted: set[str],
        now: float,
    ) -> tuple[list[StepOutput], list[str]]:
        """Records a committed step: per sampled row its token (``finished``: the core's
        reason and stop token for the requests it ended), or its final output when it
        failed or was aborted during the step. Returns the outputs in plan order and
        the ids that ended here."""
        outs: list[StepOutput] = []
        ended: list[str] = []
        stream = self.stream_text and self.tokenizer is not None
        errors = sampled.errors
        failed = bool(aborted or errors)
        for i, (s, token, lp) in enumerate(zip(states, sampled.tokens, sampled.logprobs)):
            rid = s.request_id
            if failed and (rid in aborted or i in errors):  # aborted during this step, or its row failed
                self.end(s, "abort", errors.get(i))
                outs.append(self.final_abort(s))
                ended.append(rid)
                continue
            s.output_token_ids.append(token)
            m = s.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.n_tokens += 1
            if lp is not None and s.logprobs is not None:
                self._decode_tokens(lp)
                s.logprobs.append(lp)
                s.cumulative_logprob = (s.cumulative_logprob or 0.0) + lp[token].logprob
            done = finished.get(rid) if finished else None
            if done is not None:
                why, stop_token = done
                if stop_token is not None:
                    s.stop_reason = stop_token
                self.end(s, why)
                ended.append(rid)
            out = StepOutput(rid, [token], s.finish_reason is not None, s.finish_reason, s.stop_reason)
            if lp is not None:
                out.logprobs = [lp]
            if s.prompt_logprobs is not None and len(s.output_token_ids) == 1:
                out.prompt_logprobs = s.prompt_logprobs
            if stream:
                out.text = self._text_delta(s, s.finish_reason is not None)
            outs.append(out)
        return outs, ended

    @staticmethod
    def end(s: RequestState, reason: str, error: str | None = None) -> None:
        """Ends the request (the first ending counts)."""
        if s.finish_reason is None:
            s.finish_reason = reason
            s.error = error
            s.metrics.finished_time = time.time()

    @staticmethod
    def final_abort(s: RequestState) -> StepOutput:
        """The final output of a request the engine or its caller aborted."""
        OutputProcessor.end(s, "abort")
        return StepOutput(s.request_id, [], True, "abort", None, None, s.error)

    # ----- text ---------------------------------------------------------------

    def _detokenizer(self, s: RequestState) -> IncrementalDetokenizer:
        if s.detokenizer is None:
            s.detokenizer = IncrementalDetokenizer(self.tokenizer, s.params.skip_special_tokens)
        return s.detokenizer

    def _text_delta(self, s: RequestState, done: bool) -> str:
        """The text the request's newest tokens add (incremental: O(1) per token).
        While a stop string could still be completing, its possible start is held back."""
        detok = self._detokenizer(s)
        for t in s.output_token_ids[s.n_detokenized :]:
            detok.push(t)
        s.n_detokenized = len(s.output_token_ids)
        stops = s.params.stop_strings
        if not stops:
            # the stream holds back an unfinished character; the final text is the
            # whole decode (as LLM.generate returns it), of which it is a prefix
            s.text = s.output_text(self.tokenizer) if done else detok.text
        text = s.text  # cut before a matched stop string (or through it, when asked)
        visible = len(text)
        if stops and not done and s.stop_matcher is not None:
            # hold back a suffix that may be the start of a stop string
            visible = max(0, visible - s.stop_matcher.held)
        delta = text[s.n_streamed_chars : visible]
        s.n_streamed_chars = max(s.n_streamed_chars, visible)
        return delta

    def _decode_tokens(self, lp: PositionLogprobs) -> None:
        if self.tokenizer is not None:
            for t, entry in lp.items():
                entry.decoded_token = self.tokenizer.decode([t])
