"""JSON schemas to llguidance grammars, for the supervisor: checked, cached per schema, and
built off the event loop. The grammar text travels to the worker in
`SamplingParams.grammar`, where loraxd.worker.layers.grammar masks the tokens by it.

The JSON is compact: no free whitespace (a small model given the choice pads with newlines
until it runs out of tokens), "," and ":" as separators. A schema keyword the grammar
compiler does not implement is refused (`GrammarError`, a 422 at the door), never ignored.
No torch here: llguidance's core is a Rust extension.
"""
from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

import llguidance

from loraxd.engine.thread_pool import DaemonThreadPool

_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_CACHED_SCHEMAS = 256


class GrammarError(ValueError):
    """A schema that cannot become a grammar; the message says which part and why."""


def schema_key(schema: Any) -> str:
    """The schema as compact JSON, key order kept: properties are generated in that order."""
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the schema is not JSON: {exc}") from None


def grammar_for_schema(key: str) -> str:
    """The llguidance grammar of the schema `key` (see schema_key); raises GrammarError."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(key, defaults=_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if error:
        raise GrammarError(" ".join(line.strip() for line in error.splitlines() if line.strip()))
    return grammar


class GrammarCompiler:
    """Builds grammars in a thread of its own (a large schema takes milliseconds) and keeps
    the last `_CACHED_SCHEMAS` it built."""

    def __init__(self):
        self._pool: DaemonThreadPool | None = None  # started by the first schema
        self._built: OrderedDict[str, str] = OrderedDict()

    async def compile(self, key: str) -> str:
        """The grammar of the schema `key` (see schema_key); raises GrammarError."""
        grammar = self._built.get(key)
        if grammar is None:
            if self._pool is None:
                self._pool = DaemonThreadPool(1, "grammar")
            grammar = await asyncio.wrap_future(self._pool.submit(grammar_for_schema, key))
            self._built[key] = grammar
            if len(self._built) > _CACHED_SCHEMAS:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(key)
        return grammar
