"""Structured outputs: constrain a request's tokens to a JSON schema, a regex,
a list of choices or a grammar (vLLM's ``StructuredOutputsParams``).

The parameters are plain data (no grammar engine is imported here until a
request uses them). :class:`GrammarCompiler` compiles a spec once per distinct
spec (cached) against the checkpoint's tokenizer, at ``Engine.add_request``,
so an invalid schema, regex or grammar is an ``InvalidRequestError`` at
submission. The grammar engine is `xgrammar <https://github.com/mlc-ai/xgrammar>`_
(chosen over llguidance by measurement: docs/design.md, "Structured outputs").
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spyre_cb.errors import InvalidRequestError

#: The kinds of constraint, exactly one of which a spec sets.
KINDS = ("json", "json_object", "regex", "choice", "grammar")
#: Distinct compiled specs kept per engine (least recently used dropped first).
CACHE_SIZE = 256


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a request's output must match (vLLM's names); exactly one of:

    - ``json``: a JSON schema (a dict or its JSON text);
    - ``json_object=True``: any JSON object;
    - ``regex``: a regular expression the whole output matches;
    - ``choice``: a list of strings, the output being one of them;
    - ``grammar``: an EBNF (GBNF) grammar whose ``root`` rule the output matches.

    ``disable_any_whitespace`` (JSON only) allows no free whitespace between
    JSON tokens (off by default, as in vLLM; a weak model may otherwise emit
    whitespace until ``max_tokens``).
    """

    json: str | dict[str, Any] | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, grammar; "
                f"got {', '.join(set_) if set_ else 'none'}"
            )
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequestError(
                f"structured_outputs.disable_any_whitespace must be a bool, got {type(self.disable_any_whitespace).__name__}"
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidRequestError(
                f"structured_outputs.json must be a JSON schema (a dict or its JSON text), got {type(self.json).__name__}"
            )
        if self.json_object is not None and self.json_object is not True:
            raise InvalidRequestError(f"structured_outputs.json_object must be True or None, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if (
                not isinstance(self.choice, (list, tuple))
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise InvalidRequestError(
                    f"structured_outputs.choice must be a non-empty list of non-empty strings, got {self.choice!r}"
                )

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (the cache key)."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json" and isinstance(value, dict):
            text = _json_text(value, "structured_outputs.json")
        elif kind == "json" and isinstance(value, str):
            text = _json_text(_json_parse(value), "structured_outputs.json")
        elif kind == "choice":
            text = json.dumps(list(value))
        else:
            text = str(value)
        return kind, text, self.disable_any_whitespace


def _json_parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {e}") from None


def _json_text(value: Any, what: str) -> str:
    """The schema's canonical text: keys sorted, except the order of each
    ``properties`` (the order the grammar generates them in, as in vLLM)."""
    try:
        return json.dumps(_canonical(value))
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{what} is not JSON-serializable: {e}") from None


def _canonical(value: Any, keep_order: bool = False) -> Any:
    if isinstance(value, dict):
        items = value.items() if keep_order else sorted(value.items(), key=lambda kv: str(kv[0]))
        return {k: _canonical(v, keep_order=(k == "properties" and not keep_order)) for k, v in items}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


#: xgrammar 0.2.9's JSON string characters: length-bounded strings admit raw control
#: characters, and every string admits UTF-8-encoded surrogates (invalid UTF-8); both
#: decode to text ``json.loads`` refuses or that breaks maxLength. Replaced by JSON's own class.
_XGR_STRING_CHARS = (r"[^\0-\x1f\"\\\r\n]", r"[^\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"


def choice_grammar(choices: Iterable[str]) -> str:
    """An EBNF grammar whose root is exactly one of the strings."""

    def lit(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)  # backslash, quote and control escapes, as EBNF reads them

    return "root ::= " + " | ".join(lit(c) for c in choices)


class GrammarCompiler:
    """Compiles specs for one tokenizer (xgrammar), each distinct spec once."""

    @classmethod
    def for_model(cls, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> GrammarCompiler:
        """The compiler of a checkpoint's tokenizer, its vocabulary padded to the
        model's, its EOS ids the grammars' stop tokens (InvalidRequestError without a tokenizer)."""
        if tokenizer is None:
            raise InvalidRequestError("structured outputs need the model's tokenizer; this model directory has none")
        return cls(tokenizer, vocab_size, sorted(eos_token_ids))

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # one thread: the machine's cores belong to the forward; a compile takes milliseconds
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); InvalidRequestError naming the problem."""
        key = spec.key()
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return got
        compiled = self._compile(key)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, key: tuple[str, str, bool]) -> Any:
        kind, text, no_ws = key
        c = self._compiler
        try:
            if kind in ("json", "json_object"):
                schema = text if kind == "json" else '{"type": "object"}'
                ebnf = str(self._xgr.Grammar.from_json_schema(schema, any_whitespace=not no_ws))
                # the schema's grammar with JSON's string characters (see _XGR_STRING_CHARS)
                for chars in _XGR_STRING_CHARS:
                    ebnf = ebnf.replace(chars, _JSON_STRING_CHAR)
                return c.compile_grammar(ebnf)
            if kind == "regex":
                return c.compile_regex(text)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(json.loads(text)))
            return c.compile_grammar(text)
        except Exception as e:  # noqa: BLE001 (xgrammar's errors are RuntimeError, ValueError, its own)
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex"}.get(kind, "grammar")
            msg = str(e).strip().splitlines()
            raise InvalidRequestError(
                f"structured_outputs.{kind}: invalid {what}: {msg[0] if msg else type(e).__name__}"
            ) from None

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher (one per request) for a compiled grammar."""
        return self._xgr.GrammarMatcher(compiled)


__all__ = ["StructuredOutputsParams", "GrammarCompiler", "KINDS", "choice_grammar"]
