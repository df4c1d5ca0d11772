"""`response_format` in the shapes LoRAX and OpenAI accept, to the JSON schema the output
must satisfy (pure; the grammar is built later, off the event loop, by
loraxd.engine.grammar).

- `{"type": "text"}` or absent: no constraint;
- `{"type": "json_object"}`: any JSON object; with LoRAX's `schema`, that schema (fix:
  LoRAX drops the constraint when `schema` is null);
- `{"type": "json_schema", "schema": {...}}` (LoRAX) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (OpenAI): that
  schema, always enforced strictly.
"""
from __future__ import annotations

from typing import Any

from loraxd.engine.grammar import GrammarError, schema_key
from loraxd.http.errors import validation_error

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
ANY_OBJECT = {"type": "object"}


def response_schema(raw: Any) -> str | None:
    """The schema (compact JSON, see schema_key) that `response_format` asks for, or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise validation_error("`response_format` must be an object")
    kind = raw.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise validation_error(
            f"`response_format.type` must be one of {', '.join(RESPONSE_FORMAT_TYPES)}")
    if kind == "text":
        return None
    schema = raw.get("schema")
    if kind == "json_schema" and schema is None:
        nested = raw.get("json_schema")
        if not isinstance(nested, dict):
            raise validation_error("`response_format` of type `json_schema` needs `schema` "
                                   "or OpenAI's `json_schema: {name, schema}`")
        schema = nested.get("schema")
        where = "`response_format.json_schema.schema`"
    else:
        where = "`response_format.schema`"
    if schema is None:
        if kind == "json_schema":
            raise validation_error(f"{where} is required with `json_schema`")
        schema = ANY_OBJECT
    if not isinstance(schema, dict):
        raise validation_error(f"{where} must be a JSON schema object")
    try:
        return schema_key(schema)
    except GrammarError as exc:
        raise validation_error(f"{where}: {exc}") from None


def unsupported_schema(exc: GrammarError) -> Exception:
    """The 422 of a schema the grammar compiler refuses, naming what it refused."""
    return validation_error(f"`response_format` schema is not supported: {exc}")
