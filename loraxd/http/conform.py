"""Hold a parsed body to its Struct (request_types.py): a 422 naming the field, else the
typed body.

msgspec says what failed and where (`... - at `$.parameters.top_k``); the message is
rewritten in the API's words: "Input validation error: `top_k` must be <= 2147483647".
"""
from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from loraxd.http.errors import validation_error

T = TypeVar("T")

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_WRONG_TYPE = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_CONSTRAINT = re.compile(r"^Expected `[^`]+` (?P<rule>.+)$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_KINDS = {"int": "an integer", "float": "a number", "bool": "a boolean", "str": "a string",
          "array": "a list", "object": "an object"}


def conform(obj: Any, type_: type[T]) -> T:
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        raise validation_error(describe(str(exc))) from None


def _name(path: str) -> str:
    name = path.lstrip(".")
    return name.removeprefix("parameters.") if name != "parameters" else name


def describe(message: str) -> str:
    """msgspec's ValidationError text as "`field` must be ..."."""
    at = _AT.match(message)
    what, path = at.group("what"), at.group("path") or ""
    if m := _MISSING.match(what):
        field = f"{path}.{m.group('field')}" if path else m.group("field")
        return f"`{_name(field)}` is required"
    name = f"`{_name(path)}`" if path else "the request body"
    if m := _WRONG_TYPE.match(what):
        kinds = [_KINDS.get(k.strip(), k.strip()) for k in m.group("expected").split("|")
                 if k.strip() != "null"]
        return f"{name} must be {' or '.join(kinds)}"
    if m := _CONSTRAINT.match(what):
        rule = m.group("rule")
        return f"{name} cannot be empty" if rule == "of length >= 1" else f"{name} must be {rule}"
    return f"{name}: {what[:1].lower()}{what[1:]}"
