"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A request becomes one engine request per choice (prompts x n), all run concurrently and
read through one fan-in (`merged_events`). Errors have real HTTP status codes and OpenAI's
`{"error": {message, type, ...}}` body, so the openai client raises the class that matches
the status with a useful message. A stream opens only once the first event is in, so an
adapter that cannot be loaded is still a 424, not an error inside a 200 stream; later
errors are one `data: {"error": ...}` event (the openai client raises APIError on it).
Streamed text is each token's `delta` (loraxd.engine.output): never a stop sequence, nor a
part of one that may still complete, nor a special token; the deltas concatenate to exactly
the non-streamed text.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from loraxd.engine.grammar import schema_key
from loraxd.engine.request import EngineError, FinishEvent, GenerationRequest, TokenEvent
from loraxd.http import sse
from loraxd.http.auth import authorize_adapters, caller_key
from loraxd.http.bodies import json_response, read_json_object
from loraxd.http.chat_template import ChatTemplates, parse_messages
from loraxd.http.conform import conform
from loraxd.http.errors import as_api_error
from loraxd.http.openai_schemas import (OpenAIRequest, chat_logprobs, check_num_choices,
                                        completion_logprobs, error_body, finish_reason,
                                        parse_prompts, parse_request, usage)
from loraxd.http.request_types import ChatCompletionRequest, CompletionRequest
from loraxd.http.schemas import _check
from loraxd.http.tool_calls import ToolCallStream
from loraxd.http.tool_calls import message as tool_message
from loraxd.http.tools import ToolRequest, call_schema, parse_tools
from loraxd.http.service import Frontend, Prepared, prepare, with_default_adapter

log = logging.getLogger(__name__)

_PREFIX = "data: "


@dataclass
class Choice:
    index: int
    prepared: Prepared  # of its prompt
    request: GenerationRequest
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None
    offset: int = 0  # where the next token's text starts (completions' text_offset)


async def merged_events(engine: Any, requests: list[GenerationRequest]
                        ) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """(request index, event) from all requests as they come; the first failure is raised.

    One task per request, owned here: closing this generator cancels them, which closes
    the engine's generators and frees their KV blocks.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(engine.generate(req)) as events:
                async for event in events:
                    queue.put_nowait((i, event))
                    if isinstance(event, FinishEvent):
                        return
            queue.put_nowait((i, EngineError("the engine ended a request without finishing it")))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who reports it
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        num_open = len(tasks)
        while num_open:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            num_open -= isinstance(item, FinishEvent)
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


def _openai_errors(handler: Callable) -> Callable:
    """Render every error of a /v1 route in the OpenAI shape (the middleware does the rest)."""
    @functools.wraps(handler)
    async def wrapped(self, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except (web.HTTPException, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - logged in as_api_error when unexpected
            err = as_api_error(exc)
            return json_response(error_body(err), status=err.status)
    return wrapped


class OpenAIRoutes:
    def __init__(self, frontend: Frontend):
        self.fe = frontend  # what a reload changes is read from it at each request
        self.created = int(time.time())
        self._templates: ChatTemplates | None = None

    def register(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)

    @property
    def templates(self) -> ChatTemplates:
        if self._templates is None:  # built on first use: the tokenizer is the engine's
            self._templates = ChatTemplates(self.fe.engine.tokenizer, self.fe.engine.adapter_dir)
        return self._templates

    def _parse(self, body: dict, chat: bool) -> OpenAIRequest:
        return parse_request(body, chat=chat, limits=self.fe.limits,
                             base_model_id=self.fe.model_id)

    # -- routes ------------------------------------------------------------------------------

    @_openai_errors
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request, self.fe.max_request_bytes)
        job = self._parse(body, chat=False)
        authorize_adapters(request, job.params)
        prompts = parse_prompts(body)
        check_num_choices(len(prompts), job.n)
        conform(body, CompletionRequest)
        with self.fe.limiter.slot(len(prompts) * job.n):
            prepared = [await self._prepare(job, p, add_special_tokens=True) for p in prompts]
            return await self._respond(request, job, _CompletionShape(job), prepared)

    @_openai_errors
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request, self.fe.max_request_bytes)
        job = self._parse(body, chat=True)
        tools = parse_tools(body)
        job = _with_tools(job, tools)
        authorize_adapters(request, job.params)  # before the adapter's template is fetched
        messages = parse_messages(body.get("messages"))
        conform(body, ChatCompletionRequest)
        with self.fe.limiter.slot(job.n):
            adapter = with_default_adapter(job.params, self.fe.limits).adapter
            template = await self.templates.template_for(adapter)
            prompt = template.render(messages, add_generation_prompt=True,
                                     tools=tools.offered if tools is not None else ())
            prepared = [await self._prepare(job, prompt, add_special_tokens=False)]
            return await self._respond(request, job, _ChatShape(job, tools), prepared)

    async def models(self, request: web.Request) -> web.Response:
        """The base model and the adapters the engine knows. An adapter first fetched with
        a token is left out: it may be private, and its id is not everyone's to see; so is
        one the caller's API key may not use."""
        key = caller_key(request)
        base = self.fe.model_id
        data = [{"id": base, "object": "model", "created": self.created, "owned_by": "loraxd"}]
        seen = {base}
        entries = getattr(getattr(self.fe.engine, "adapters", None), "entries", None) or {}
        for entry in list(entries.values()):
            ref = entry.ref
            if not hasattr(ref, "adapter_id") or ref.adapter_id in seen or ref.api_token:
                continue  # merges have no single id
            if key is not None and not key.may_use(ref.adapter_id):
                continue
            seen.add(ref.adapter_id)
            data.append({"id": ref.adapter_id, "object": "model", "created": self.created,
                         "owned_by": "loraxd", "root": ref.adapter_id, "parent": base})
        return json_response({"object": "list", "data": data})

    # -- shared ------------------------------------------------------------------------------

    async def _prepare(self, job: OpenAIRequest, prompt: str, *,
                       add_special_tokens: bool) -> Prepared:
        """One engine request per choice: n sequences with seeds seed, seed+1, ..."""
        params = replace(job.params, best_of=job.n)
        return await prepare(self.fe.engine, prompt, params, self.fe.limits,
                             grammars=self.fe.grammars,
                             add_special_tokens=add_special_tokens)

    async def _respond(self, request: web.Request, job: OpenAIRequest, shape: Any,
                       prepared: list[Prepared]) -> web.StreamResponse:
        choices = [Choice(index=len(prepared[0].requests) * p + j, prepared=prep, request=req,
                          offset=len(prep.inputs) if job.echo else 0)
                   for p, prep in enumerate(prepared) for j, req in enumerate(prep.requests)]
        num_prompt = sum(len(p.prompt_ids) for p in prepared)
        events = merged_events(self.fe.engine, [c.request for c in choices])
        async with contextlib.aclosing(events):
            first = await anext(events)  # before any header: an early failure keeps its status
            if job.stream:
                return await _Stream(request, job, shape, choices, num_prompt).run(first, events)
            for i, event in [first] + [e async for e in events]:
                _record(choices[i], event)
        return json_response({**shape.envelope(), "choices": [shape.choice(c) for c in choices],
                              "usage": usage(num_prompt, _num_generated(choices))})


def _with_tools(job: OpenAIRequest, tools: ToolRequest | None) -> OpenAIRequest:
    """`required` or a named function: the answer is constrained to one call's schema."""
    if tools is None or tools.choice == "none":
        return job
    _check(job.params.response_schema is None,
           "`response_format` cannot be combined with `tools` (unless `tool_choice` is "
           "\"none\"): a tool call is JSON of its own")
    if not tools.constrained:
        return job
    _check(not job.params.ignore_eos, "`ignore_eos` cannot be combined with `tool_choice` "
           "\"required\" or a function: the answer ends where the call does")
    return replace(job, params=replace(job.params, response_schema=schema_key(call_schema(tools))))


def _record(choice: Choice, event: TokenEvent | FinishEvent) -> None:
    if isinstance(event, TokenEvent):
        choice.tokens.append(event)
    else:
        choice.finish = event


def _num_generated(choices: list[Choice]) -> int:
    return sum(c.finish.generated_tokens for c in choices if c.finish is not None)


class _Stream:
    """One SSE response: chunks per token, the finish per choice, usage, `[DONE]`."""

    def __init__(self, request: web.Request, job: OpenAIRequest, shape: Any,
                 choices: list[Choice], num_prompt: int):
        self.request, self.job, self.shape = request, job, shape
        self.choices, self.num_prompt = choices, num_prompt
        self.envelope = shape.envelope(chunk=True)
        if job.include_usage:
            self.envelope["usage"] = None

    async def run(self, first: tuple, events: AsyncIterator) -> web.StreamResponse:
        response = await sse.open_stream(self.request)
        try:
            for choice in self.choices:
                opening = self.shape.opening(choice)
                if opening is not None:
                    await self._send(response, [opening])
            await self._on_event(response, *first)
            async for i, event in events:
                await self._on_event(response, i, event)
            if self.job.include_usage:
                await self._send(response, [], usage=usage(self.num_prompt,
                                                           _num_generated(self.choices)))
            await sse.send_raw(response, sse.DONE)
            await response.write_eof()
        except ConnectionResetError:
            log.debug("client left a stream; its requests are cancelled")
        except Exception as exc:  # noqa: BLE001 - the stream's last event says what failed
            with contextlib.suppress(ConnectionResetError):
                await sse.send(response, error_body(as_api_error(exc)), prefix=_PREFIX)
                await sse.send_raw(response, sse.DONE)
                await response.write_eof()
        return response

    async def _on_event(self, response: web.StreamResponse, i: int,
                        event: TokenEvent | FinishEvent) -> None:
        choice = self.choices[i]
        _record(choice, event)
        if isinstance(event, TokenEvent):  # its delta holds back stop sequences (engine)
            offset = choice.offset
            choice.offset += 0 if event.special else len(event.text)
            if event.delta or self.job.num_logprobs is not None:
                for chunk in self.shape.deltas(choice, event.delta, [event], offset, None):
                    await self._send(response, [chunk])
        else:  # the last token's delta ended the text
            for chunk in self.shape.deltas(choice, "", [], choice.offset, event):
                await self._send(response, [chunk])

    async def _send(self, response: web.StreamResponse, choices: list[dict], **extra) -> None:
        await sse.send(response, {**self.envelope, "choices": choices, **extra}, prefix=_PREFIX)


# -- the two response shapes ------------------------------------------------------------------


class _CompletionShape:
    def __init__(self, job: OpenAIRequest):
        self.job = job
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, chunk: bool = False) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.job.model}

    def choice(self, c: Choice) -> dict:
        prefix = c.prepared.inputs if self.job.echo else ""
        logprobs = None
        if self.job.num_logprobs is not None:
            prefill = c.finish.prefill if self.job.echo else ()
            logprobs = completion_logprobs(c.tokens, self.job.num_logprobs, len(prefix), prefill)
        return {"index": c.index, "text": prefix + c.finish.generated_text, "logprobs": logprobs,
                "finish_reason": finish_reason(c.finish)}

    def opening(self, c: Choice) -> dict | None:
        if not self.job.echo:
            return None
        return {"index": c.index, "text": c.prepared.inputs, "logprobs": None,
                "finish_reason": None}

    def deltas(self, c: Choice, text: str, tokens: list[TokenEvent], offset: int,
               finish: FinishEvent | None) -> list[dict]:
        """The chunks of one token's text, or of the finish (`finish` given)."""
        logprobs = None
        if self.job.num_logprobs is not None and tokens:
            logprobs = completion_logprobs(tokens, self.job.num_logprobs, offset)
        reason = finish_reason(finish) if finish is not None else None
        return [{"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}]


class _ChatShape:
    def __init__(self, job: OpenAIRequest, tools: ToolRequest | None = None):
        self.job = job
        self.tools = tools if tools is not None and tools.choice != "none" else None
        self.tool_streams: dict[int, ToolCallStream] = {}  # choice index -> its stream
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, chunk: bool = False) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.job.model}

    def _logprobs(self, tokens: list[TokenEvent]) -> dict | None:
        if self.job.num_logprobs is None:
            return None
        return chat_logprobs(tokens, self.job.num_logprobs)

    def choice(self, c: Choice) -> dict:
        message, called = tool_message(c.finish.generated_text, self.tools)
        return {"index": c.index, "message": message, "logprobs": self._logprobs(c.tokens),
                "finish_reason": "tool_calls" if called else finish_reason(c.finish)}

    def opening(self, c: Choice) -> dict:
        return {"index": c.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def deltas(self, c: Choice, text: str, tokens: list[TokenEvent], offset: int,
               finish: FinishEvent | None) -> list[dict]:
        """The chunks of one token's text, or of the finish (`finish` given). With tools,
        text that is a call goes out as `tool_calls` deltas (loraxd.http.tool_calls)."""
        logprobs = self._logprobs(tokens) if tokens else None
        if self.tools is None:
            reason = finish_reason(finish) if finish is not None else None
            delta = {"content": text} if text or finish is None else {}
            return [self._chunk(c, delta, logprobs, reason)]
        stream = self.tool_streams.setdefault(c.index, ToolCallStream(self.tools))
        deltas = stream.feed(text)
        if finish is None:
            if not deltas and logprobs is not None:
                deltas = [{}]  # the token's logprobs still go out
            return [self._chunk(c, d, logprobs if i == 0 else None, None)
                    for i, d in enumerate(deltas)]
        deltas += stream.finish()
        reason = "tool_calls" if stream.made_calls else finish_reason(finish)
        return [self._chunk(c, d, None, None) for d in deltas] + [
            self._chunk(c, {}, None, reason)]

    @staticmethod
    def _chunk(c: Choice, delta: dict, logprobs: dict | None, reason: str | None) -> dict:
        return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
