"""Chat messages to one prompt string, through the model's (or adapter's) jinja chat template.

Rendering follows transformers' `apply_chat_template`: a sandboxed jinja environment with
`trim_blocks` / `lstrip_blocks`, the `raise_exception` and `strftime_now` globals, the
non-escaping `tojson` filter, `{% generation %}` blocks accepted, and the special token
strings (`bos_token`, `eos_token`, ...) in the context. The rendered text already holds
the template's special tokens, so it is tokenized without adding any.
"""
from __future__ import annotations

import asyncio
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraxd.engine.request import AdapterRef
from loraxd.engine.tokenizer import chat_files
from loraxd.http.errors import ApiError, validation_error
from loraxd.http.tools import Tool, tool_prompt

# Message keys a template may read besides role and content; anything else is dropped.
_PASSED_KEYS = ("name", "tool_call_id")


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training) renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> tuple[jinja2.Template, bool]:
    """The template, and whether it reads the `tools` variable."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    return env.from_string(source), reads_tools


class ChatTemplate:
    """One compiled template plus the special token strings its context carries."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        # a syntax error surfaces at load, not per request
        self._template, self.reads_tools = _compile(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: tuple[Tool, ...] = ()) -> str:
        """The prompt text; a template's own refusal (raise_exception) or failure is a 422.

        A template that does not read `tools` gets them as a system message instead, and
        earlier tool calls as the JSON text a call is."""
        tools_context = None
        if tools and self.reads_tools:
            tools_context = [t.as_openai() for t in tools]
        elif tools or any("tool_calls" in m for m in messages):
            messages = _without_tool_fields(messages, tools)
        try:
            return self._template.render(messages=messages, tools=tools_context, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise validation_error(f"the chat template refused the messages: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise validation_error(
                f"the chat template could not render the messages: {exc}") from None


class ChatTemplates:
    """The base model's template, and each adapter's own when its directory ships one
    (chat_template.jinja, chat_template.json, or `chat_template` in tokenizer_config.json);
    an adapter without one, and a merge of adapters, use the base model's."""

    def __init__(self, tokenizer: Any, adapter_dir: Callable[[AdapterRef], Awaitable[Path]]):
        source = getattr(tokenizer, "chat_template", None)
        special = getattr(tokenizer, "special_tokens", None) or {}
        self._adapter_dir = adapter_dir  # fetches (and authorises) the adapter's files
        self._own: dict[tuple[str, float], ChatTemplate | None] = {}  # (dir, mtime) -> own
        self.base: ChatTemplate | None = None
        self._broken: str | None = None
        try:
            self.base = ChatTemplate(source, special) if source else None
        except jinja2.exceptions.TemplateSyntaxError as exc:
            self._broken = f"the model's chat template does not compile: {exc}"

    async def template_for(self, adapter: AdapterRef | None) -> ChatTemplate:
        """The template a request for `adapter` renders with (None: the base model)."""
        if adapter is not None:
            own = await self._adapter_template(adapter)
            if own is not None:
                return own
        if self._broken is not None:
            raise ApiError(500, "incomplete_generation", self._broken)
        if self.base is None:
            raise validation_error("the model has no chat template; use /v1/completions")
        return self.base

    async def _adapter_template(self, adapter: AdapterRef) -> ChatTemplate | None:
        directory = await self._adapter_dir(adapter)
        key = (str(directory), await asyncio.to_thread(_mtime, directory))
        if key not in self._own:
            source, special = await asyncio.to_thread(chat_files, directory)
            base_special = self.base.special_tokens if self.base is not None else {}
            try:
                self._own[key] = (ChatTemplate(source, {**base_special, **special})
                                  if source else None)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise validation_error(f"adapter {adapter.adapter_id}'s chat template does "
                                       f"not compile: {exc}") from None
        return self._own[key]


_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def _mtime(directory: Path) -> float:
    """The newest change to the files a template comes from (0: none of them)."""
    times = [(directory / name).stat().st_mtime for name in _TEMPLATE_FILES
             if (directory / name).exists()]
    return max(times, default=0.0)


def _without_tool_fields(messages: list[dict], tools: tuple[Tool, ...]) -> list[dict]:
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            text = json.dumps([{"name": c["function"]["name"],
                                "arguments": c["function"]["arguments"]} for c in calls],
                              ensure_ascii=False)
            m["content"] = f"{m['content']}\n{text}" if m["content"] else text
        out.append(m)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tool_prompt(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt(tools)})
    return out


# -- messages -------------------------------------------------------------------------------


def parse_messages(raw: Any) -> list[dict]:
    """OpenAI `messages` as the plain dicts templates expect: string `content`.

    Content is a string, null, or a list of `{type: "text", text}` parts (joined with
    newlines); any other part type is refused.
    """
    if not isinstance(raw, list) or not raw:
        raise validation_error("`messages` must be a non-empty list")
    return [_message(m, i) for i, m in enumerate(raw)]


def _message(raw: Any, i: int) -> dict:
    where = f"`messages[{i}]`"
    if not isinstance(raw, dict):
        raise validation_error(f"{where} must be an object")
    role = raw.get("role")
    if not isinstance(role, str) or not role:
        raise validation_error(f"{where}.role must be a non-empty string")
    if raw.get("function_call"):
        raise validation_error(f"{where}: `function_call` (deprecated) is not supported; "
                               "use `tool_calls`")
    message = {"role": role, "content": _content(raw.get("content"), where)}
    if raw.get("tool_calls"):
        message["tool_calls"] = _tool_calls(raw["tool_calls"], where)
    for key in _PASSED_KEYS:
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise validation_error(f"{where}.{key} must be a string")
            message[key] = value
    return message


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise validation_error(f"{where}.content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise validation_error(f"{where}.content[{j}] must be an object")
        kind = part.get("type")
        if kind != "text":
            raise validation_error(
                f"{where}.content[{j}]: content parts of type `{kind}` are not supported; "
                "only `text`")
        text = part.get("text")
        if not isinstance(text, str):
            raise validation_error(f"{where}.content[{j}].text must be a string")
        texts.append(text)
    return "\n".join(texts)


def _tool_calls(raw: Any, where: str) -> list[dict]:
    """An assistant's earlier calls as templates read them: arguments as an object."""
    if not isinstance(raw, list):
        raise validation_error(f"{where}.tool_calls must be a list")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise validation_error(f"{where}.tool_calls[{j}] must be "
                                   "{id, type: function, function: {name, arguments}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise validation_error(f"{where}.tool_calls[{j}].function.arguments must be "
                                       "a JSON object") from None
        calls.append({"id": call.get("id"), "type": "function",
                      "function": {"name": name, "arguments": arguments or {}}})
    return calls
