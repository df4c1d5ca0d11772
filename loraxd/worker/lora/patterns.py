"""Regular expressions from adapter configs, matched in linear time by RE2.

adapter_config.json is untrusted input (anyone may publish a hub adapter). Python's `re`
backtracks: `"target_modules": "(.|.)*Z"` would run for ever inside one C call holding the
GIL, stopping every stream of the worker. RE2 matches in time linear in the name and
refuses what needs backtracking (backreferences, lookarounds), which no PEFT config needs.
"""
from __future__ import annotations

import functools

import re2

from loraxd.worker.lora.errors import AdapterIncompatible

MAX_PATTERN_CHARS = 4096
_SHOWN_CHARS = 100


def compile_pattern(pattern, field: str, template: str = "{}"):
    """`template` with the config's `pattern` put in, compiled by RE2; AdapterIncompatible
    naming `field` and the pattern when it is not a string, too long or not RE2 syntax."""
    if not isinstance(pattern, str):
        raise AdapterIncompatible(f"adapter_config.json: {field} {shown(pattern)} is not a "
                                  f"string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterIncompatible(f"adapter_config.json: {field} regex {shown(pattern)} is "
                                  f"{len(pattern)} characters long (at most "
                                  f"{MAX_PATTERN_CHARS})")
    regex = _compile(template.format(pattern))
    if isinstance(regex, str):
        raise AdapterIncompatible(
            f"adapter_config.json: {field} regex {shown(pattern)} is not supported: {regex} "
            f"(adapter patterns are matched by RE2: no backreferences or lookarounds)")
    return regex


def fullmatch(pattern, name: str, field: str) -> bool:
    return compile_pattern(pattern, field).fullmatch(name) is not None


@functools.lru_cache(maxsize=256)  # bounded: a compiled pattern can take MBs
def _compile(source: str):
    """The compiled regex, or RE2's reason as a string (failures are cached too)."""
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refusal to stderr
    try:
        return re2.compile(source, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."
