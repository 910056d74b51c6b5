"""Tokenizer: any Unicode string round-trips; whitespace is displayed visibly."""

from __future__ import annotations

import pytest

from attention_lens.model import Tokenizer, display_token
from attention_lens.registry import DEFAULT_WEIGHTS

SAMPLES = [
    "",
    "Harry Potter and the Philosopher's Stone",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "漢字かな交じり文 and 中文",
    "مرحبا بالعالم — שלום עולם",
    "control \x01\x07\x1b[31m and \u200b zero-width",
    "tabs\tand\nnewlines\r\n  double  spaces ",
    "\ufeffbyte order mark, combining e\u0301, surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_WEIGHTS / "attn-only-2l" / "tokenizer.json")


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(shipped, text):
    ids = shipped.encode(text)
    assert shipped.decode(ids) == text
    assert all(0 <= i < shipped.vocab_size for i in ids)


def test_vocabulary_size(shipped):
    assert shipped.vocab_size == 4096


def test_display_strings(shipped):
    assert display_token(" the") == "·the"
    assert display_token("\n\t ") == "↵→·"
    ids = shipped.encode("a b\nc\td")
    shown = "".join(shipped.display(i) for i in ids)
    assert shown == "a·b↵c→d"


def test_token_to_id(shipped):
    assert shipped.token_to_id(" the") is not None
    assert shipped.token_to_id(" antidisestablishmentarianism") is None


def test_encode_rejects_non_text(shipped):
    with pytest.raises(TypeError):
        shipped.encode(b"bytes")  # type: ignore[arg-type]
