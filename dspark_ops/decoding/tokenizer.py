"""Byte-level tokenizer of the built-in model: ids 0..255 are bytes, then
BOS, EOS and PAD."""
from __future__ import annotations

from typing import List

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, *, bos: bool = True) -> List[int]:
    return ([BOS] if bos else []) + list(text.encode("utf-8"))


def decode(ids: List[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
