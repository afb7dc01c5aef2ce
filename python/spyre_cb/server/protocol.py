"""The OpenAI request bodies (pydantic) and their conversion into what the
engine runs: prompt token ids and validated ``SamplingParams``.

Nothing a client sends is silently ignored: every field either has its
effect or is refused with a 400 naming it (as vLLM refuses it); fields this
server does not know are accepted and named in a warning in the log, as vLLM
does. Token ids must be JSON integers (``true`` or ``1.0`` are refused).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, field_validator

from spyre_cb.beam_search import BeamSearchParams
from spyre_cb.engine import check_text
from spyre_cb.errors import SpyreCBError
from spyre_cb.params import MAX_LOGPROBS
from spyre_cb.sampling import SamplingParams
from spyre_cb.server.errors import APIError
from spyre_cb.server.tools import ToolCallStream, ToolChoice, tool_choice
from spyre_cb.structured import StructuredOutputsParams

log = logging.getLogger("spyre_cb.server")

#: A prompt longer than this many characters per token of ``max_model_len``
#: cannot fit: it is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32
#: Most sequences (prompts x ``n``) one request may ask for.
MAX_SEQUENCES_PER_REQUEST = 256

# ----- request bodies -------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    #: usage (tokens so far) in every chunk, not only at the end (vLLM's extra)
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's, plus vLLM's extras)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  #: the served model when omitted
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    #: beam search: a finished beam's summed logprob is divided by its length to this power (vLLM's extra)
    length_penalty: float = 1.0
    #: beam search: its width, where given (vLLM's use of it); else ``n``
    best_of: int | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: the server's default for JSON constraints the body cannot tune (set by ``use_server_defaults``)
    _disable_any_whitespace: bool = PrivateAttr(default=False)

    def use_server_defaults(self, disable_any_whitespace: bool) -> None:
        """Takes the server's defaults for what the body does not say."""
        self._disable_any_whitespace = disable_any_whitespace

    def params(self, default_max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=_logit_bias(self.logit_bias),
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logprobs=logprobs,
            prompt_logprobs=self.wanted_prompt_logprobs,
            structured_outputs=self.structured(),
        )

    def structured(self) -> StructuredOutputsParams | None:
        """The one output constraint the body asks for: OpenAI's ``response_format``
        (``json_object``, ``json_schema``), vLLM's ``structured_outputs`` or its
        older ``guided_*`` fields, or (chat) a tool call; more than one is a 400."""
        given = self._constraints()
        if not given:
            return None
        if len(given) > 1:
            names = ", ".join(n for n, _ in given)
            raise APIError(400, f"give one output constraint, got {names}", "invalid_request_error", given[1][0])
        name, spec = given[0]
        if isinstance(spec, StructuredOutputsParams):
            return spec
        try:
            return StructuredOutputsParams(**{"disable_any_whitespace": self._disable_any_whitespace, **spec})
        except (TypeError, SpyreCBError) as e:
            raise APIError(400, f"{name}: {e}", "invalid_request_error", name) from None

    def _constraints(self) -> list[tuple[str, Any]]:
        """Each constraint the body sets: (its field, its spec)."""
        given: list[tuple[str, Any]] = []
        rf = self.response_format
        if rf is not None and rf.get("type", "text") != "text":
            kind = rf.get("type")
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema") or {}
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise APIError(
                        400,
                        "response_format json_schema needs json_schema.schema (an object)",
                        "invalid_request_error",
                        "response_format",
                    )
                given.append(("response_format", {"json": schema}))
            else:
                raise APIError(
                    400,
                    f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                    "invalid_request_error",
                    "response_format",
                )
        if self.structured_outputs is not None:
            given.append(("structured_outputs", dict(self.structured_outputs)))
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {key: value}))
        return given

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def refuse_unsupported(self) -> None:
        """400 for what this server cannot do yet (never ignored), as vLLM refuses what it cannot."""
        if self.use_beam_search:
            self._check_beam_search()
        elif self.length_penalty != 1.0:
            raise APIError(400, "length_penalty needs use_beam_search", "invalid_request_error", "length_penalty")
        if self.best_of is not None and self.best_of > 1 and not self.use_beam_search:
            raise APIError(
                400,
                f"best_of {self.best_of} is supported only as the beam width of use_beam_search, as in vLLM",
                "invalid_request_error",
                "best_of",
            )
        if self.use_beam_search and self.best_of is not None and self.best_of < self.n:
            raise APIError(
                400, f"best_of {self.best_of} must be at least n {self.n}", "invalid_request_error", "best_of"
            )
        self.structured()  # a malformed or doubled constraint is a 400 before anything runs
        warn_unknown(self)

    #: beams a beam search runs (its ``n`` best are returned): vLLM takes best_of where given
    @property
    def beam_width(self) -> int:
        return max(self.n, self.best_of or 0)

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        try:
            return BeamSearchParams(
                beam_width=self.beam_width,
                max_tokens=max_tokens,
                ignore_eos=self.ignore_eos,
                temperature=self.temperature,
                length_penalty=self.length_penalty,
            )
        except SpyreCBError as e:
            raise APIError(400, str(e), "invalid_request_error", _beam_param(str(e))) from None

    def _beam_search_conflicts(self) -> list[str]:
        """The fields set that a beam search cannot honour (it picks the most likely
        beams: no sampling knobs, no constraints, no stop strings, no streaming)."""
        set_ = {
            "stream": self.stream,
            "top_p": self.top_p != 1.0,
            "top_k": self.top_k not in (0, -1),
            "min_p": self.min_p != 0.0,
            "stop": bool(self.stop),
            "stop_token_ids": bool(self.stop_token_ids),
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "min_tokens": self.min_tokens != 0,
            "logit_bias": bool(self.logit_bias),
            "truncate_prompt_tokens": self.truncate_prompt_tokens is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
            "skip_special_tokens": not self.skip_special_tokens,
            "seed": self.seed is not None,  # a beam search is deterministic: a seed would do nothing
        }
        names = [name for name, on in set_.items() if on]
        names += [name for name, _ in self._constraints()]
        return names

    def _check_beam_search(self) -> None:
        bad = self._beam_search_conflicts()
        if bad:
            raise APIError(
                400, f"{', '.join(bad)} cannot be used with use_beam_search", "invalid_request_error", bad[0]
            )


def _beam_param(message: str) -> str | None:
    """The field a beam search's error is about (``n`` stands for the width)."""
    for words, field in (("beam", "n"), ("max_tokens", "max_tokens"), ("temperature", "temperature")):
        if words in message:
            return field
    return "length_penalty" if "length_penalty" in message else None


def warn_unknown(body: BaseModel) -> None:
    """Names, in the log, the fields of a body this server does not use (OpenAI's
    ``user`` among them), as vLLM does: accepted, never silently."""
    if body.model_extra:
        log.warning("request fields this server does not use, ignored: %s", ", ".join(sorted(body.model_extra)))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids_are_ints(cls, v: Any) -> Any:
        items = v if isinstance(v, list) else []
        for x in [y for item in items for y in (item if isinstance(item, list) else [item])]:
            if isinstance(x, (bool, float)):
                raise ValueError(f"prompt token ids must be JSON integers, got {x!r}")
        return v

    #: the top-k alternatives of every generated token (0..20)
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        # echo with logprobs reports the prompt tokens' logprobs too
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def _beam_search_conflicts(self) -> list[str]:
        return super()._beam_search_conflicts() + (["logprobs"] if self.logprobs is not None else [])

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported", "invalid_request_error", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(
                400,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                "invalid_request_error",
                "logprobs",
            )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    #: return the chosen tokens' logprobs (``choices[].logprobs.content``)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    #: False: at most one tool call per message
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    #: the validated tools and tool_choice (set by ``check_tools``)
    _tools: ToolChoice | None = PrivateAttr(default=None)

    def check_tools(self, auto_parser: str | None) -> ToolChoice | None:
        """Validates ``tools`` and ``tool_choice`` (a 400 names the field); ``auto_parser``:
        the server's parser of ``tool_choice: "auto"`` calls (None: "auto" is refused)."""
        self._tools = tool_choice(self.tools, self.tool_choice, parser=auto_parser, parallel=self.parallel_tool_calls)
        return self._tools

    def tool_calls(self) -> ToolCallStream | None:
        """A fresh reader of one choice's text into tool calls (None: no tools)."""
        return self._tools.stream() if self._tools is not None else None

    def _constraints(self) -> list[tuple[str, Any]]:
        given = super()._constraints()
        spec = self._tools.constraint(self._disable_any_whitespace) if self._tools is not None else None
        if spec is not None:
            given.append(("tool_choice", spec))
        return given

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(
                    400,
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                    "invalid_request_error",
                    "top_logprobs",
                )
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                "invalid_request_error",
                "continue_final_message",
            )

    def _beam_search_conflicts(self) -> list[str]:
        extra = ["logprobs"] if self.logprobs else []
        return super()._beam_search_conflicts() + extra + (["tools"] if self.tools else [])

    @property
    def n_logprobs(self) -> int | None:
        """The alternatives per generated token the engine reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ----- bodies into prompts and SamplingParams ------------------------------------------


def sampling_params(body: _Sampling, default_max: int | None, n_index: int) -> SamplingParams:
    """The validated params of choice ``n_index`` (with ``n > 1`` a seed moves by the index)."""
    try:
        logprobs = body.n_logprobs if isinstance(body, ChatRequest) else getattr(body, "logprobs", None)
        p = body.params(default_max, logprobs)
        if body.n > 1 and p.seed is not None:
            p = dataclasses.replace(p, seed=(p.seed + n_index) % 2**64)
        p.validate()
        return p
    except SpyreCBError as e:
        raise APIError(400, str(e), "invalid_request_error") from None


def completion_prompts(body: CompletionRequest, tokenizer: Any, max_model_len: int) -> list[list[int]]:
    """The token ids of each prompt: a text, a list of texts, ids, or a list of id lists."""
    p = body.prompt
    if isinstance(p, str):
        return [_encode(tokenizer, p, max_model_len)]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    out = []
    for x in p:
        out.append(_encode(tokenizer, x, max_model_len) if isinstance(x, str) else list(x))  # type: ignore[arg-type]
    if not out:
        raise APIError(400, "prompt must not be empty", "invalid_request_error", "prompt")
    return out


def chat_messages(body: ChatRequest, max_model_len: int) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: a content given as a list of
    text parts becomes the same text as a string (parts joined by newlines, as
    vLLM does); any other part is refused."""
    out = []
    total = 0
    for i, m in enumerate(body.messages):
        msg = m.model_dump(exclude_none=True)
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}]: only text parts are supported, got type {kind!r}",
                        "invalid_request_error",
                        "messages",
                    )
                texts.append(part["text"])
            content = msg["content"] = "\n".join(texts)
        if isinstance(content, str):
            _check(content, f"messages[{i}].content", "messages")
            total += len(content)
        out.append(msg)
    _check_length(total, max_model_len, "messages")
    return out


def chat_prompt(body: ChatRequest, tokenizer: Any, max_model_len: int) -> list[int]:
    """The messages through the chat template (the request's or the tokenizer's), with the
    generation prompt or continuing the final message, and ``chat_template_kwargs``."""
    template = body.chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
    if tokenizer is None or template is None:
        raise APIError(400, "this model's tokenizer has no chat template", "invalid_request_error", "messages")
    msgs = chat_messages(body, max_model_len)
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        if body.tools:
            kwargs.setdefault("tools", body.tools)
        ids = tokenizer.apply_chat_template(
            msgs,
            chat_template=body.chat_template,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=True,
            **kwargs,
        )
    except Exception as e:
        raise APIError(400, f"could not apply the chat template: {e}", "invalid_request_error", "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _encode(tokenizer: Any, text: str, max_model_len: int) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send prompt token ids", "invalid_request_error", "prompt")
    _check(text, "prompt", "prompt")
    _check_length(len(text), max_model_len, "prompt")
    return list(tokenizer(text).input_ids)


def _check(text: str, what: str, param: str) -> None:
    try:
        check_text(text, what)
    except SpyreCBError as e:
        raise APIError(400, str(e), "invalid_request_error", param) from None


def _check_length(chars: int, max_model_len: int, param: str) -> None:
    limit = MAX_CHARS_PER_TOKEN * max_model_len
    if chars > limit:
        raise APIError(
            400,
            f"{param} has {chars} characters, more than can fit in max_model_len {max_model_len} tokens "
            f"(at most {MAX_CHARS_PER_TOKEN} characters per token: {limit})",
            "invalid_request_error",
            param,
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for k, v in bias.items():
        try:
            out[int(k)] = v
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {k!r}", "invalid_request_error", "logit_bias"
            ) from None
    return out


__all__ = [
    "StreamOptions",
    "CompletionRequest",
    "ChatMessage",
    "ChatRequest",
    "sampling_params",
    "completion_prompts",
    "chat_messages",
    "chat_prompt",
    "MAX_CHARS_PER_TOKEN",
    "MAX_SEQUENCES_PER_REQUEST",
]
