"""Sample texts: a long English passage cut to any number of tokens, prompts a real model
should answer, and strings that exercise a tokenizer (spaces, digits, Unicode, emoji, code,
special tokens). The bench, the load test and the tests read them."""

from __future__ import annotations

import random
from typing import Any

#: English prose, three times over: cut to the length a measurement needs.
BENCH_TEXT = (
    "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were "
    "perfectly normal, thank you very much. They were the last people you'd expect to be "
    "involved in anything strange or mysterious, because they just didn't hold with such "
    "nonsense. Mr Dursley was the director of a firm called Grunnings, which made drills. "
    "He was a big, beefy man with hardly any neck, although he did have a very large "
    "moustache. Mrs Dursley was thin and blonde and had nearly twice the usual amount of "
    "neck, which came in very useful as she spent so much of her time craning over garden "
    "fences, spying on the neighbours. The Dursleys had a small son called Dudley and in "
    "their opinion there was no finer boy anywhere. "
) * 3


def flow_prompt(lm: Any, n_tokens: int, variant: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` tokens of ``lm`` (``variant`` shuffles its words, so
    each variant is a distinct prompt)."""
    words = BENCH_TEXT.split()
    random.Random(variant).shuffle(words)
    ids = lm.tokenizer.encode(" ".join(words * (1 + 4 * n_tokens // len(words))))[:n_tokens]
    return lm.tokenizer.decode(ids)


#: Prompts with a famous answer, for a real model's predictions and parity checks.
REAL_PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Harry Potter went home. Harry Potter",
    "1, 2, 3, 4, 5, 6, 7,",
]
#: Strings a tokenizer must encode as the model's own tokenizer does.
TOKENIZER_STRINGS = [
    "The capital of France is", " Harry Potter", "  two  spaces,\ta tab and\nnew\n\nlines ",
    "Digits 0 12 345 6789 3.14159 1,000,000",
    "Unicode: Café naïve façade 東京 Москва ß",
    "Emoji 🙂🚀👩‍👩‍👧 🇫🇷", "def main():\n    return {'a': [1, 2]}  # code\n",
    "<|endoftext|>special<|im_start|>user\nhi<|im_end|>", "Ünïcödé\u00a0nbsp and ‘quotes’",
]

