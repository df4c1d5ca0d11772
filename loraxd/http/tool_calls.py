"""OpenAI `tool_calls` read back from a chat answer, whole or streamed (pure).

A model calls a tool the way its template taught it: a bare JSON object
`{"name": ..., "arguments": {...}}` (or `"parameters"`, Llama 3's word), a list of them, or
each one inside `<tool_call>...</tool_call>` (Hermes, Qwen). Only calls that name an
offered tool count; anything else is the answer's text.

Streaming follows OpenAI: a call's first chunk carries its `index`, `id`, `type` and
`function.name` with empty `arguments`; the arguments follow in pieces; the last chunk has
an empty delta and `finish_reason: "tool_calls"`. A constrained call (`required`, a named
function) is streamed piece by piece as it is generated; in `auto`, an answer that starts
like a call is held back until it ends, then sent as calls or as text.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from loraxd.http.tools import ToolRequest

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPEN_TAG = "<tool_call>"
# The start of a constrained call as its grammar writes it (compact JSON, name first).
_HEADER = re.compile(r'^\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict:
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_calls(text: str, request: ToolRequest) -> list[dict] | None:
    """The tool calls the text makes, or None when it is not (only) tool calls."""
    stripped = text.strip()
    if request.constrained:
        match = _HEADER.match(stripped)
        if match is None or not stripped.endswith("}"):
            return None
        try:
            json.loads(stripped)
        except ValueError:
            return None  # cut short (max_tokens, a stop sequence)
        return [_call(json.loads(match.group(1)), stripped[match.end():-1])]
    blocks = _TAGGED.findall(stripped)
    if blocks and not _TAGGED.sub("", stripped).strip():
        items = [_json(b) for b in blocks]
    else:
        whole = _json(stripped)
        items = whole if isinstance(whole, list) else [whole]
    calls = [_as_call(item, request) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls if request.parallel else calls[:1]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _as_call(item: Any, request: ToolRequest) -> dict | None:
    if not isinstance(item, dict) or item.get("name") not in request.names():
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    return _call(item["name"], json.dumps(arguments, ensure_ascii=False))


def message(text: str, request: ToolRequest | None) -> tuple[dict, bool]:
    """The assistant message of a whole answer, and whether it made tool calls."""
    calls = parse_calls(text, request) if request is not None else None
    if calls is None:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": None, "tool_calls": calls}, True


class ToolCallStream:
    """One choice's stream: text in, OpenAI `delta` objects out."""

    def __init__(self, request: ToolRequest):
        self.request = request
        self.buffer = ""  # text held back
        self.held = False  # auto: the answer may be a call
        self.decided = False  # auto: the answer is known to be text
        self.header_sent = False  # constrained: the call's first chunk is out
        self.sent_args = 0  # constrained: characters of the arguments sent
        self.made_calls = False

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.request.constrained:
            self.buffer += text
            return self._constrained()
        if self.decided:
            return [{"content": text}]
        self.buffer += text
        head = self.buffer.lstrip()
        if not head or head[0] in "{[" or _OPEN_TAG.startswith(head[:len(_OPEN_TAG)]):
            self.held = True
            return []
        self.decided, text, self.buffer = True, self.buffer, ""
        return [{"content": text}]

    def _constrained(self) -> list[dict]:
        out = []
        match = _HEADER.match(self.buffer)
        if match is None:
            return out
        if not self.header_sent:
            self.header_sent = self.made_calls = True
            self.id = call_id()
            out.append(_call_delta(0, {"name": json.loads(match.group(1)), "arguments": ""},
                                   self.id))
        args = self.buffer[match.end():]
        ready = args[:-1]  # the last character may be the call object's closing brace
        if len(ready) > self.sent_args:
            out.append(_call_delta(0, {"arguments": ready[self.sent_args:]}))
            self.sent_args = len(ready)
        return out

    def finish(self) -> list[dict]:
        """The deltas still held back, once the answer is complete."""
        if self.request.constrained:
            if not self.header_sent:
                return [{"content": self.buffer}] if self.buffer else []
            return []  # the closing brace is the call object's own
        if not self.held or self.decided:
            return []
        calls = parse_calls(self.buffer, self.request)
        if calls is None:
            return [{"content": self.buffer}]
        self.made_calls = True
        out = []
        for index, call in enumerate(calls):
            function = call["function"]
            out.append(_call_delta(index, {"name": function["name"], "arguments": ""},
                                   call["id"]))
            out.append(_call_delta(index, {"arguments": function["arguments"]}))
        return out


def _call_delta(index: int, function: dict, id: str | None = None) -> dict:
    call: dict[str, Any] = {"index": index}
    if id is not None:
        call.update(id=id, type="function")
    call["function"] = function
    return {"tool_calls": [call]}
