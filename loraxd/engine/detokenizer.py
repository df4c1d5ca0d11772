"""Incremental detokenization that is right for multi-byte characters and leading spaces.

Each step decodes a small window: the text of `ids[prefix:]` minus the text of
`ids[prefix:read]`. A piece ending in U+FFFD is an incomplete UTF-8 sequence: it is held
back until the next token completes it.
"""
from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as context, so that a tokenizer which drops a word's leading space at
# the start of a decode (sentencepiece) still renders the first generated word right.
_CONTEXT = 6


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], special_ids: frozenset[int]):
        self._tok = tokenizer
        self._special = special_ids
        self._ids = [i for i in prompt_ids[-_CONTEXT:] if i not in special_ids]
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is incomplete)."""
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        window = self._ids[self._prefix:]
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(window)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""
