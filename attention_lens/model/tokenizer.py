"""Tokenizer wrapper around HF ``tokenizers`` with display strings for whitespace."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

WHITESPACE_DISPLAY = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_table()
#: A byte-fallback token's name in SentencePiece-style vocabularies (``<0xE2>``).
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _show_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decoding error handler: each byte that is not whole UTF-8 shown as ⟨0xE2⟩."""
    bad = err.object[err.start:err.end]
    return "".join(f"⟨0x{b:02X}⟩" for b in bad), err.end


codecs.register_error("attention_lens_bytes", _show_bytes)


def bytes_text(raw: bytes) -> str:
    """``raw`` as text, every byte of an incomplete UTF-8 sequence written ⟨0xE2⟩."""
    return raw.decode("utf-8", errors="attention_lens_bytes")


def display_token(text: str) -> str:
    """Show whitespace visibly: space as ``·``, newline as ``↵``, tab as ``→``."""
    return "".join(WHITESPACE_DISPLAY.get(ch, ch) for ch in text)


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode``/``decode`` plus per-token display strings."""

    def __init__(self, hf: HFTokenizer, source: str = "") -> None:
        self.hf = hf
        self.source = source
        self.vocab_size = hf.get_vocab_size()
        self._strings: list[str] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json``."""
        return cls(HFTokenizer.from_file(str(path)), source=str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> "Tokenizer":
        """Train a byte-level BPE (GPT-2 style, every byte in the base alphabet)."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        self.hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """The raw text of one token (may be a partial UTF-8 sequence, shown with U+FFFD)."""
        return self.strings[token_id]

    @property
    def strings(self) -> list[str]:
        """Raw text of every token id, computed once."""
        if self._strings is None:
            self._strings = [self.hf.decode([i], skip_special_tokens=False)
                             for i in range(self.vocab_size)]
        return self._strings

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of one token (byte-level and byte-fallback vocabularies), else None."""
        name = self.hf.id_to_token(token_id)
        if name is None:
            return None
        byte = BYTE_TOKEN.match(name)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if all(ch in BYTE_LEVEL for ch in name):
            return bytes(BYTE_LEVEL[ch] for ch in name)
        return None

    def display(self, token_id: int) -> str:
        """Display string of one token, whitespace made visible; a token that is part of a
        UTF-8 character shows its bytes (⟨0xE2⟩), never the replacement character."""
        text = self.token_text(token_id)
        if "\ufffd" in text:
            raw = self.token_bytes(token_id)
            if raw is not None:
                text = bytes_text(raw)
        return display_token(text)

    def token_to_id(self, token: str) -> int | None:
        """Id of a single-token string, or None if ``token`` is not exactly one token."""
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None

    def __len__(self) -> int:
        return self.vocab_size
