"""Chat messages to one prompt string, through the model's (or adapter's) jinja chat template.

Rendering follows transformers' `apply_chat_template`: a sandboxed jinja environment with
`trim_blocks` / `lstrip_blocks`, the `raise_exception` and `strftime_now` globals, the
non-escaping `tojson` filter, `{% generation %}` blocks accepted, and the special token
strings (`bos_token`, `eos_token`, ...) in the context. The rendered text already holds
the template's special tokens, so it is tokenized without adding any.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraxd.engine.request import AdapterRef
from loraxd.http.errors import ApiError, validation_error

# Message keys a template may read besides role and content; anything else is dropped.
_PASSED_KEYS = ("name",)


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
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """One compiled template plus the special token strings its context carries."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)  # a syntax error surfaces at load, not per request

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template's own refusal (raise_exception) or failure is a 422."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise validation_error(f"the chat template refused the messages: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise validation_error(
                f"the chat template could not render the messages: {exc}") from None


class ChatTemplates:
    """The base model's template, and the hook that picks an adapter's own."""

    def __init__(self, tokenizer: Any):
        source = getattr(tokenizer, "chat_template", None)
        special = getattr(tokenizer, "special_tokens", None) or {}
        self.base: ChatTemplate | None = None
        self._broken: str | None = None
        try:
            self.base = ChatTemplate(source, special) if source else None
        except jinja2.exceptions.TemplateSyntaxError as exc:
            self._broken = f"the model's chat template does not compile: {exc}"

    async def template_for(self, adapter: AdapterRef | None) -> ChatTemplate:
        """The template a request for `adapter` renders with (None: the base model).

        Hook: an adapter whose directory ships a chat template (chat_template.jinja, or
        `chat_template` in its tokenizer_config.json) should get that one, built with
        `ChatTemplate(source, self.base.special_tokens)`. For now every request uses the
        base model's. It is async so it can await the adapter's fetch.
        """
        if self._broken is not None:
            raise ApiError(500, "incomplete_generation", self._broken)
        if self.base is None:
            raise validation_error("the model has no chat template; use /v1/completions")
        return self.base


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
    if raw.get("tool_calls") or raw.get("function_call"):
        raise validation_error(f"{where}: tool calls are not supported yet")
    message = {"role": role, "content": _content(raw.get("content"), where)}
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
