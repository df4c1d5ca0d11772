"""OpenTelemetry traces of generation requests, one trace per request, when `otlp_endpoint` is
set (tracing_export.py sends them). Without it make_app installs none of this.

The root span (kind SERVER) covers the HTTP request from its arrival to its last byte. Each
sequence the request ran (best_of, n and prompts run one each) adds three children, made
when it finished: `queue` (it reached the engine, adapter fetch included, to its admission
into a step), `prefill` (admission to its first token: the admitting step), `decode` (first
token to finish). A sequence that failed or was abandoned adds none: the root's error says
why. A W3C `traceparent` header makes the request's trace a part of the caller's.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loraxd.engine.request import FinishEvent, GenerationRequest, MergedAdapters, TokenEvent
from loraxd.http.metrics_recorder import GENERATING_ROUTES, current_record

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class RequestTrace:
    """What the root span says once the request is answered, gathered from its sequences."""

    root: trace.Span
    context: Any  # the root's: the sequences' spans are its children
    num_sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    adapter_id: str | None = None


_CURRENT: ContextVar[RequestTrace | None] = ContextVar("loraxd_request_trace", default=None)


def adapter_name(req: GenerationRequest) -> str | None:
    """The adapter as the request named it; merged adapters comma-joined; None: the base."""
    spec = req.adapter_spec
    if spec is None:
        return None
    return ",".join(spec.ids) if isinstance(spec, MergedAdapters) else spec.adapter_id


def sequence_spans(tracer: trace.Tracer, parent: Any, finish: FinishEvent, index: int, *,
                   arrived: float, first_token: float | None, finished: float) -> None:
    """The queue, prefill and decode spans of a finished sequence. Times are monotonic
    seconds; admission is `arrived` plus the engine's queue time, kept in order."""
    first_token = finished if first_token is None else min(first_token, finished)
    admitted = min(arrived + max(finish.queue_time_s, 0.0), first_token)
    now, now_ns = time.monotonic(), time.time_ns()

    def ns(t: float) -> int:
        return now_ns - int((now - t) * 1e9)

    phases = (("queue", arrived, admitted, {}),
              ("prefill", admitted, first_token, {"loraxd.prompt_tokens": finish.prompt_tokens}),
              ("decode", first_token, finished,
               {"loraxd.generated_tokens": finish.generated_tokens,
                "loraxd.finish_reason": finish.finish_reason}))
    for name, start, end, attributes in phases:
        span = tracer.start_span(name, context=parent, start_time=ns(start),
                                 attributes={"loraxd.sequence": index, **attributes})
        span.end(end_time=ns(end))


def end_root(trace_: RequestTrace, status: int | None, error: tuple[str, str] | None) -> None:
    """`error`: (error type, message) the client was shown, if any."""
    root = trace_.root
    if status is not None:
        root.set_attribute("http.response.status_code", status)
    if trace_.adapter_id is not None:
        root.set_attribute("loraxd.adapter_id", trace_.adapter_id)
    root.set_attributes({"loraxd.sequences": trace_.num_sequences,
                         "loraxd.prompt_tokens": trace_.prompt_tokens,
                         "loraxd.generated_tokens": trace_.generated_tokens,
                         "loraxd.finish_reasons": trace_.finish_reasons})
    if error is not None:
        root.set_attribute("error.type", error[0])
        root.set_status(Status(StatusCode.ERROR, error[1]))
    root.end()


def _shown_error(status: int | None) -> tuple[str, str] | None:
    """The error the client got: the one rendered for it (streams too), else the status's."""
    record = current_record()
    if record is not None and record.error is not None:
        return record.error, record.error_message or record.error
    if status is not None and status >= 400:
        return str(status), f"HTTP {status}"
    return None


class Tracing:
    def __init__(self, tracer: trace.Tracer):
        self.tracer = tracer

    def middleware(self):
        """The root span. It sits inside the metrics middleware, whose record of the error
        shown it reads, and outside the error middleware, whose response it sees."""
        @web.middleware
        async def trace_request(request: web.Request, handler) -> web.StreamResponse:
            if request.method != "POST" or request.path not in GENERATING_ROUTES:
                return await handler(request)
            root = self.tracer.start_span(
                f"POST {request.path}", context=_PROPAGATOR.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.route": request.path})
            current = RequestTrace(root, trace.set_span_in_context(root))
            token = _CURRENT.set(current)
            status, error = None, None
            try:
                response = await handler(request)
                status = response.status
                return response
            except (asyncio.CancelledError, ConnectionResetError):
                error = ("dropped", "the client left before the answer ended")
                raise
            except web.HTTPException as exc:  # below 400: the error middleware lets it by
                status = exc.status
                raise
            finally:
                _CURRENT.reset(token)
                end_root(current, status, error or _shown_error(status))
        return trace_request

    def traced(self, engine: Any) -> TracedEngine:
        return TracedEngine(engine, self.tracer)


class TracedEngine:
    """The engine as the routes see it: `generate` also times each sequence for the trace
    of the request running it; everything else is the engine's own."""

    def __init__(self, engine: Any, tracer: trace.Tracer):
        self._engine = engine
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, req: GenerationRequest, **kwargs: Any) -> AsyncIterator:
        current = _CURRENT.get()
        if current is not None:
            index = current.num_sequences
            current.num_sequences += 1
            current.adapter_id = current.adapter_id or adapter_name(req)
        arrived, first_token = time.monotonic(), None
        # aclosing: closing this generator closes the engine's at once (frees the slot)
        async with contextlib.aclosing(self._engine.generate(req, **kwargs)) as events:
            async for event in events:
                if current is not None:
                    if first_token is None and isinstance(event, TokenEvent):
                        first_token = time.monotonic()
                    elif isinstance(event, FinishEvent):
                        current.prompt_tokens += event.prompt_tokens
                        current.generated_tokens += event.generated_tokens
                        current.finish_reasons.append(event.finish_reason)
                        sequence_spans(self._tracer, current.context, event, index,
                                       arrived=arrived, first_token=first_token,
                                       finished=time.monotonic())
                yield event
