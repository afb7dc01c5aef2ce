"""Incremental detokenization: the text of a growing token sequence, one piece
per token, without decoding the whole sequence again each step.

With a fast (Rust) tokenizer it uses ``tokenizers``' ``DecodeStream``, which
holds back the bytes of an unfinished UTF-8 character until it completes;
otherwise (or when the tokenizer cleans up spaces after decoding, which is
not incremental) it falls back to decoding the sequence and taking the new
suffix. Either way ``text`` is a prefix of ``tokenizer.decode(tokens)``, equal
to it once the last character is complete.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self.text = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes ("" while a character is unfinished)."""
        if self._backend is not None:
            piece = self._stream.step(self._backend, token) or ""
        else:
            self._ids.append(token)
            full: str = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
            if full.endswith("\ufffd"):  # an unfinished character: wait for its next byte
                return ""
            piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        return piece


__all__ = ["IncrementalDetokenizer"]
