"""Incremental detokenization equals decoding the whole sequence, across
multi-byte characters, streaming and in the fallback that decodes the sequence."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from spyre_cb.detokenizer import IncrementalDetokenizer

TEXTS = [
    "The river was higher than the old stone bridge.",
    "héllo wörld — naïve café, ✓ done",
    "日本語のテキストと絵文字 🙂🚀 mixed with ASCII",
    "tabs\tand\nnewlines  and   spaces",
]


@pytest.fixture(scope="module")
def fast(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def cleaning(tiny_model):
    # cleaning up spaces after decoding is not incremental: the detokenizer decodes the sequence instead
    return AutoTokenizer.from_pretrained(tiny_model, clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("kind", ["stream", "fallback"])
def test_pieces_add_up_to_the_full_decode(kind, fast, cleaning):
    tok = fast if kind == "stream" else cleaning
    assert (IncrementalDetokenizer(tok)._backend is not None) == (kind == "stream")
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        d = IncrementalDetokenizer(tok)
        full = tok.decode(ids, skip_special_tokens=True)
        pieces = []
        for i, t in enumerate(ids):
            pieces.append(d.push(t))
            assert full.startswith(d.text), (text, i)
        assert "".join(pieces) == d.text == full == text


def test_random_token_sequences_stay_a_prefix(fast):
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(len(fast)) for _ in range(rng.randint(1, 40))]
        d = IncrementalDetokenizer(fast)
        for t in ids:
            d.push(t)
        full = fast.decode(ids, skip_special_tokens=True)
        assert full.startswith(d.text)
        assert full.rstrip("\ufffd") == d.text or full == d.text
