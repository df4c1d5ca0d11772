"""Recording the series of metrics_series.py as requests, steps and adapter moves happen.

An HTTP request to a generating route gets a `RequestRecord` in a context variable for its
whole life (the handler and the tasks it starts see it). `MeteredEngine.generate` notes on
it each sequence the request hands the engine; `note_error` (called for every error a
client is shown, streams included) notes the first error type. When the handler is done,
the record becomes one success or one failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from loraxd.engine.adapters import adapter_key
from loraxd.engine.request import FinishEvent, GenerationRequest
from loraxd.http.metrics_series import AdapterLabels, Series

GENERATING_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/completions",
                               "/v1/chat/completions"})


@dataclass
class RequestRecord:
    arrived: float
    queued: float | None = None  # when its first sequence went to the engine
    adapter: str | None = None  # the `adapter` label, once a sequence went to the engine
    error: str | None = None  # the first error type the client was shown
    error_message: str | None = None  # and its message (traces show it)
    num_finished: int = 0


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("loraxd_request_record", default=None)


def note_error(error_type: str, message: str | None = None) -> None:
    """The request being served (if it is metered) failed with `error_type`."""
    record = _CURRENT.get()
    if record is not None and record.error is None:
        record.error, record.error_message = error_type, message


def current_record() -> RequestRecord | None:
    """The record of the generating request being served, if any."""
    return _CURRENT.get()


class Recorder:
    def __init__(self, series: Series, labels: AdapterLabels, engine: Any):
        self.series = series
        self.labels = labels
        self.engine = engine

    # -- requests ----------------------------------------------------------------------------

    def middleware(self):
        @web.middleware
        async def record_request(request: web.Request, handler) -> web.StreamResponse:
            if request.method != "POST" or request.path not in GENERATING_ROUTES:
                return await handler(request)
            record = RequestRecord(time.monotonic())
            token = _CURRENT.set(record)
            self.series.request_count.inc()
            try:
                response = await handler(request)
                if record.error is None and response.status >= 400:  # aiohttp's own (413)
                    record.error = "bad_request" if response.status < 500 else "internal"
                return response
            except asyncio.CancelledError:  # the client left
                record.error = record.error or "dropped"
                raise
            finally:
                _CURRENT.reset(token)
                self._request_done(record)
        return record_request

    def _request_done(self, record: RequestRecord) -> None:
        s = self.series
        error = record.error or (None if record.num_finished else "dropped")
        if error is not None:
            s.request_failure.inc(err=error)
            if record.adapter is not None:
                s.adapter_requests.labels(record.adapter, "failure").inc()
            return
        now = time.monotonic()
        s.request_success.inc()
        s.request_duration.observe(now - record.arrived)
        s.validation_duration.observe((record.queued or now) - record.arrived)
        s.adapter_requests.labels(record.adapter, "success").inc()
        s.adapter_duration.labels(record.adapter).observe(now - record.arrived)

    def _label(self, req: GenerationRequest) -> str:
        spec = req.adapter_spec
        entries = getattr(getattr(self.engine, "adapters", None), "entries", None) or {}
        entry = entries.get(adapter_key(spec)) if spec is not None else None
        first_token = bool(getattr(getattr(entry, "ref", None), "api_token", None))
        return self.labels.of(spec, first_fetched_with_token=first_token)

    def sequence_started(self, req: GenerationRequest) -> None:
        s = self.series
        s.input_length.observe(len(req.prompt_ids))
        s.max_new_tokens.observe(req.max_new_tokens)
        record = _CURRENT.get()
        if record is not None and record.queued is None:
            record.queued = time.monotonic()

    def sequence_finished(self, req: GenerationRequest, finish: FinishEvent) -> None:
        s = self.series
        s.queue_duration.observe(finish.queue_time_s)
        s.inference_duration.observe(finish.inference_time_s)
        s.generated_tokens.observe(finish.generated_tokens)
        if finish.generated_tokens:
            s.time_per_token.observe(finish.inference_time_s / finish.generated_tokens)
        label = self._label(req)
        s.adapter_prompt_tokens.labels(label).inc(finish.prompt_tokens)
        s.adapter_generated_tokens.labels(label).inc(finish.generated_tokens)
        record = _CURRENT.get()
        if record is not None:
            record.num_finished += 1
            record.adapter = record.adapter or label

    def sequence_failed(self, req: GenerationRequest) -> None:
        record = _CURRENT.get()
        if record is not None and record.adapter is None:
            record.adapter = self._label(req)

    # -- steps and adapter moves (called by the engine) --------------------------------------

    def step_done(self, plan: Any, result: Any, seconds: float) -> None:
        s, step = self.series, plan.step
        method = "prefill" if step.new_seqs else "decode"
        s.batch_count.inc(method=method)
        failed = result is None or not hasattr(result, "outputs")  # lost, or StepFailed
        (s.batch_failure if failed else s.batch_success).inc(method=method)
        if not failed:
            s.batch_duration.labels(method).observe(seconds)
        if step.new_seqs:
            s.batch_next_size.observe(len(step.new_seqs))
            if plan.join_reason is not None:
                s.batch_concat.inc(reason=plan.join_reason)

    def adapter_moved(self, stage: str, entry: Any, seconds: float) -> None:
        self.series.adapter_move.labels(stage).observe(seconds)

    def attach(self) -> None:
        """Observe the engine's steps and adapter moves (engines without them: nothing)."""
        steps = getattr(self.engine, "steps", None)
        if hasattr(steps, "step_observers"):
            steps.step_observers.append(self.step_done)
        adapters = getattr(self.engine, "adapters", None)
        if hasattr(adapters, "timing_observers"):
            adapters.timing_observers.append(self.adapter_moved)


class MeteredEngine:
    """The engine as the routes see it: `generate` also tells the recorder about each
    sequence; everything else is the engine's own."""

    def __init__(self, engine: Any, recorder: Recorder):
        self._engine = engine
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, req: GenerationRequest, **kwargs: Any) -> AsyncIterator:
        self._recorder.sequence_started(req)
        finished = False
        try:
            # aclosing: closing this generator closes the engine's at once (frees the slot)
            async with contextlib.aclosing(self._engine.generate(req, **kwargs)) as events:
                async for event in events:
                    if isinstance(event, FinishEvent):
                        finished = True
                        self._recorder.sequence_finished(req, event)
                    yield event
        finally:
            if not finished:
                self._recorder.sequence_failed(req)
