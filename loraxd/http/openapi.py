"""GET /openapi.json and /docs: the API's description, generated from the Structs that hold
requests (request_types.py) and state responses (response_types.py) by msgspec's JSON Schema
generation, and the table of operations below. The document describes this daemon: its
limits (max_best_of, max_input_length, ...; rebuilt when a reload changes them) and, with
API keys configured, which routes need one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from loraxd import __version__
from loraxd.http import request_types as rq
from loraxd.http import response_types as rs
from loraxd.http.bodies import json_response
from loraxd.http.docs_page import DOCS_HTML
from loraxd.http.schemas import Limits

_REF = "#/components/schemas/{name}"

ERRORS = {
    400: "malformed JSON, wrong content type, a body over the size limit or too slow",
    401: "API keys are configured and the request has no valid one",
    403: "the key is valid but may not use this adapter (or the base model)",
    422: "a parameter rule; the message is `Input validation error: <what>`",
    424: "an adapter cannot be fetched or loaded (the message says which and why)",
    429: "more sequences in flight than max_concurrent_requests",
    500: "an internal failure; the daemon keeps serving",
    503: "draining, or no healthy worker",
}
_GENERATING = (400, 403, 422, 424, 429, 500, 503)
SSE = "text/event-stream"
JSON = "application/json"


@dataclass(frozen=True)
class Events:
    """A text/event-stream answer: each event's `data` is JSON of one of `shapes`, or the
    literal `[DONE]` when `done` (OpenAI's end)."""

    shapes: tuple[type, ...]
    done: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    ok: dict[str, Any]  # content type -> Struct, Events, or None (no JSON body)
    body: type | None = None
    errors: tuple[int, ...] = ()
    error_shape: type = rs.ErrorResponse
    description: str = ""
    tags: tuple[str, ...] = field(default=("native",))


_STREAM_NOTE = ("Every error after the body is read, even one before any token, is one "
                "`data:{ErrorResponse}` event (status 200), and the stream ends.")

OPERATIONS = (
    Operation("post", "/generate", "Generate text", {JSON: rs.GenerateResponse},
              rq.GenerateRequest, _GENERATING,
              description="Response headers: x-prompt-tokens, x-generated-tokens, "
                          "x-total-time, x-queue-time, x-inference-time, x-time-per-token, "
                          "x-model-id, x-adapter-id (when an adapter was used)."),
    Operation("post", "/generate_stream", "Generate text as server-sent events",
              {SSE: Events((rs.StreamResponse, rs.ErrorResponse))}, rq.GenerateRequest,
              (400, 422), description="`data:{StreamResponse}` per token, no `[DONE]`. A "
              "body that is no JSON object is a 400 or 422 answer. " + _STREAM_NOTE),
    Operation("post", "/", "Generate (LoRAX's compatibility route)",
              {JSON: list[rs.GenerateResponse], SSE: Events((rs.StreamResponse, rs.ErrorResponse))},
              rq.GenerateRequest,
              _GENERATING,
              description="`stream: true`: the /generate_stream events (" + _STREAM_NOTE +
                          "); else a list of one GenerateResponse."),
    Operation("post", "/tokenize", "Tokenize", {JSON: list[rs.TokenizedToken]},
              rq.TokenizeRequest, (400, 422, 429)),
    Operation("get", "/health", "Health: a real forward pass", {}, errors=(503,),
              description="200 with an empty body when the model generates."),
    Operation("get", "/info", "Model and limits", {JSON: rs.Info}),
    Operation("get", "/metrics", "Prometheus metrics", {"text/plain": None, JSON: rs.Metrics},
              description="Prometheus text; JSON with `Accept: application/json`."),
    Operation("post", "/v1/completions", "OpenAI completions",
              {JSON: rs.Completion, SSE: Events((rs.Completion, rs.OpenAIErrorResponse), True)},
              rq.CompletionRequest, _GENERATING,
              rs.OpenAIErrorResponse, "`stream: true`: `data: {Completion}` chunks, then "
              "`data: [DONE]`.", ("openai",)),
    Operation("post", "/v1/chat/completions", "OpenAI chat completions",
              {JSON: rs.ChatCompletion,
               SSE: Events((rs.ChatCompletionChunk, rs.OpenAIErrorResponse), True)},
              rq.ChatCompletionRequest, _GENERATING, rs.OpenAIErrorResponse,
              "`stream: true`: `data: {ChatCompletionChunk}` chunks, then `data: [DONE]`.",
              ("openai",)),
    Operation("get", "/v1/models", "OpenAI models: the base model and known adapters",
              {JSON: rs.ModelList}, error_shape=rs.OpenAIErrorResponse, tags=("openai",)),
    Operation("get", "/openapi.json", "This document", {JSON: dict[str, Any]}, tags=("meta",)),
    Operation("get", "/docs", "This document, as a page", {"text/html": None},
              tags=("meta",)),
)


def _types() -> list[Any]:
    found: list[Any] = []
    for op in OPERATIONS:
        for t in (op.body, op.error_shape, *op.ok.values()):
            for one in t.shapes if isinstance(t, Events) else (t,):
                if one is not None and one not in found:
                    found.append(one)
    return found


def _tighten(component: dict, name: str, **bounds: Any) -> None:
    """Add the configured limit to a property's non-null branch."""
    prop = component["properties"][name]
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(bounds)


def _with_limits(schemas: dict, limits: Limits) -> None:
    params = schemas["Parameters"]
    _tighten(params, "best_of", maximum=limits.max_best_of)
    _tighten(params, "truncate", maximum=limits.max_input_length)
    _tighten(params, "max_new_tokens", maximum=limits.max_total_tokens - 1)
    _tighten(params, "stop", maxItems=limits.max_stop_sequences)
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        _tighten(schemas[request], "max_tokens", maximum=limits.max_total_tokens - 1)


def _content(shape: Any, refs: dict[Any, Any]) -> dict:
    if shape is None:
        return {"schema": {"type": "string"}}
    if not isinstance(shape, Events):
        return {"schema": refs[shape]}
    # An SSE schema describes one event; its `data` is JSON text of the payload's shape.
    payload = {"anyOf": [refs[t] for t in shape.shapes]}
    json_data = {"contentMediaType": JSON, "contentSchema": payload}
    data = {"type": "string", **({"if": {"const": "[DONE]"}, "else": json_data}
                                 if shape.done else json_data)}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _operation(op: Operation, refs: dict, keys_required: bool, public: bool) -> dict:
    out: dict[str, Any] = {"summary": op.summary, "tags": list(op.tags),
                           "operationId": f"{op.method}_{op.path.strip('/') or 'root'}"
                           .replace("/", "_").replace(".", "_")}
    if op.description:
        out["description"] = op.description
    if op.body is not None:
        out["requestBody"] = {"required": True,
                              "content": {JSON: {"schema": refs[op.body]}}}
    responses: dict[str, Any] = {"200": {"description": "OK"}}
    if op.ok:
        responses["200"]["content"] = {m: _content(t, refs) for m, t in op.ok.items()}
    errors = list(op.errors)
    if keys_required and not public:
        errors.append(401)
    for status in sorted(errors):
        responses[str(status)] = {"description": ERRORS[status], "content": {
            JSON: {"schema": refs[op.error_shape]}}}
    out["responses"] = responses
    if keys_required:
        out["security"] = [] if public else [{"apiKey": []}]
    return out


def build_spec(limits: Limits, *, keys_required: bool, public_routes: tuple[str, ...]) -> dict:
    types = _types()
    refs_list, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, refs_list))
    _with_limits(schemas, limits)
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(
            op, refs, keys_required, op.path in public_routes)
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "loraxd", "version": __version__,
                 "description": "One base model, many LoRA adapters: the LoRAX API and "
                                "OpenAI's completions. Every request parameter is optional "
                                "and may be null unless marked required."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if keys_required:
        spec["components"]["securitySchemes"] = {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "An API key from the server's keys file (api_keys_file)."}}
    return spec


class OpenAPIRoutes:
    def __init__(self, frontend: Any, *, keys_required: bool, public_routes: tuple[str, ...]):
        self.frontend = frontend  # loraxd.http.service.Frontend: the limits in force
        self.keys_required = keys_required
        self.public_routes = public_routes
        self._limits: Limits | None = None
        self._spec: dict = {}

    @property
    def spec(self) -> dict:
        limits = self.frontend.limits
        if limits != self._limits:
            self._spec = build_spec(limits, keys_required=self.keys_required,
                                    public_routes=self.public_routes)
            self._limits = limits
        return self._spec

    def register(self, app: web.Application) -> None:
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/docs", self.docs)

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(self.spec)

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=DOCS_HTML, content_type="text/html")
