"""OpenAI `tools` / `tool_choice` on /v1/chat/completions: the request side (pure).

- `none`: the tools are left out of the prompt and the answer is text.
- `auto` (the default with tools): the tools go through the chat template (its own `tools`
  variable when it reads one, else a system message that lists them and says how to call
  one); the output is text, read back as tool calls when it is one (see tool_calls.py).
- `required`, or a named function: the same prompt, and the output is constrained to one
  call, `{"name": ..., "arguments": {...}}`, by the JSON schema `call_schema` builds: the
  constrained decoding of `response_format`, so the call always parses and its arguments
  satisfy the function's `parameters`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from loraxd.http.errors import validation_error

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_NO_PARAMETERS = {"type": "object", "properties": {}}
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of the arguments object

    def as_openai(self) -> dict:
        """The shape chat templates read (transformers passes OpenAI's)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str  # none | auto | required | function
    function: str | None = None  # the named function of `choice` "function"
    parallel: bool = True  # parallel_tool_calls

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the prompt shows: none for `none`, the named one for a function."""
        if self.choice == "none":
            return ()
        if self.choice == "function":
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools

    def names(self) -> set[str]:
        return {t.name for t in self.offered}


def parse_tools(body: Mapping) -> ToolRequest | None:
    """`tools`, `tool_choice`, `parallel_tool_calls`; None when the request has no tools."""
    raw_tools, raw_choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise validation_error("`functions` / `function_call` (deprecated) are not supported; "
                               "use `tools` / `tool_choice`")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise validation_error("`parallel_tool_calls` must be a boolean")
    tools = _tools(raw_tools)
    choice, function = _choice(raw_choice, tools)
    if not tools:
        return None
    return ToolRequest(tools, choice, function, parallel is not False)


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise validation_error("`tools` must be a list")
    tools = []
    for i, item in enumerate(raw):
        where = f"`tools[{i}]`"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise validation_error(f"{where} must be an object of type `function`")
        function = item.get("function")
        if not isinstance(function, dict):
            raise validation_error(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise validation_error(f"{where}.function.name must be 1 to 64 letters, digits, "
                                   "`_` or `-`")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise validation_error(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = _NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise validation_error(f"{where}.function.parameters must be a JSON schema object")
        tools.append(Tool(name, description, parameters))
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise validation_error(f"`tools` names {', '.join(duplicates)} more than once")
    return tuple(tools)


def _choice(raw: Any, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            raise validation_error(f"`tool_choice` must be one of {', '.join(TOOL_CHOICES)} "
                                   "or a function")
        if raw == "required" and not tools:
            raise validation_error("`tool_choice` \"required\" needs `tools`")
        return raw, None
    function = raw.get("function") if isinstance(raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(name, str):
        raise validation_error("`tool_choice` must be a string or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t.name for t in tools}:
        raise validation_error(f"`tool_choice` names function `{name}`, which is not in "
                               "`tools`")
    return "function", name


def call_schema(request: ToolRequest) -> dict:
    """The JSON schema of one call to one of the offered tools: name first, then arguments."""
    options = [{"type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in request.offered]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_prompt(tools: tuple[Tool, ...]) -> str:
    """What a template without a `tools` variable is told, as a system message."""
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return ("You can call these tools (JSON schemas of their arguments):\n" + listing +
            "\nTo call a tool, answer with only a JSON object: "
            '{"name": <the tool\'s name>, "arguments": <its arguments>}.')
