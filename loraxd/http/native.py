"""The LoRAX-native routes: /generate, /generate_stream, /, /tokenize, /health, /info.

Shapes follow LoRAX's API exactly; the unmodified lorax-client parses every one of them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from loraxd import __version__
from loraxd.engine.request import FinishEvent, PromptToken, TokenEvent
from loraxd.http import sse
from loraxd.http.auth import authorize_adapters
from loraxd.http.bodies import json_response, read_json_object
from loraxd.http.conform import conform
from loraxd.http.errors import ApiError, as_api_error, error_body, error_response, validation_error
from loraxd.http.request_types import GenerateRequest, TokenizeRequest
from loraxd.http.schemas import GenerateParams, parse_inputs, parse_parameters
from loraxd.http.service import (Completion, EventPump, Frontend, Prepared, complete_all,
                                 prepare)

log = logging.getLogger(__name__)

# A logprob of -inf (or NaN) is sent as float32's lowest value: JSON has no -inf and the
# clients parse logprob as a number.
_LOWEST_LOGPROB = -3.4028234663852886e38


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _LOWEST_LOGPROB


def token_json(token: TokenEvent, with_alternatives: bool) -> dict:
    out = {"id": token.token_id, "text": token.text, "logprob": _logprob(token.logprob),
           "special": token.special, "skipped": False}
    if with_alternatives:
        out["alternative_tokens"] = [
            {"id": a.token_id, "text": a.text, "logprob": _logprob(a.logprob)}
            for a in token.alternatives]
    return out


def _end_token(last_id: int) -> dict:
    """The token of a final event whose FinishEvent came after its last token was sent."""
    return {"id": last_id, "text": "", "logprob": 0.0, "special": True, "skipped": True}


def _prefill_json(prefill: tuple[PromptToken, ...]) -> list[dict]:
    return [{"id": t.token_id, "text": t.text,
             "logprob": None if i == 0 or t.logprob is None else _logprob(t.logprob)}
            for i, t in enumerate(prefill)]


def _full_text(prepared: Prepared, generated_text: str) -> str:
    return prepared.inputs + generated_text if prepared.params.return_full_text else generated_text


def _sequence_json(prepared: Prepared, done: Completion) -> dict:
    """The fields a Details and a best_of sequence share."""
    params, finish = prepared.params, done.finish
    alternatives = params.sampling.num_alternatives > 0
    return {"finish_reason": finish.finish_reason, "generated_tokens": finish.generated_tokens,
            "seed": done.seed,
            "prefill": _prefill_json(finish.prefill) if params.decoder_input_details else [],
            "tokens": [token_json(t, alternatives) for t in done.tokens]}


def generate_json(prepared: Prepared, completions: list[Completion]) -> dict:
    """GenerateResponse; `completions` best first."""
    best = completions[0]
    out: dict[str, Any] = {"generated_text": _full_text(prepared, best.finish.generated_text)}
    if prepared.params.with_details:
        seq = _sequence_json(prepared, best)
        out["details"] = {
            "finish_reason": seq["finish_reason"], "prompt_tokens": best.finish.prompt_tokens,
            "generated_tokens": seq["generated_tokens"], "skipped_tokens": 0,
            "seed": seq["seed"], "prefill": seq["prefill"], "tokens": seq["tokens"]}
        if len(completions) > 1:
            out["details"]["best_of_sequences"] = [
                {"generated_text": _full_text(prepared, c.finish.generated_text),
                 **_sequence_json(prepared, c)} for c in completions[1:]]
    return out


def _stream_event(prepared: Prepared, token: dict, finish: FinishEvent | None) -> dict:
    event: dict[str, Any] = {"token": token, "generated_text": None, "details": None}
    if finish is not None:
        event["generated_text"] = _full_text(prepared, finish.generated_text)
        if prepared.params.details:
            event["details"] = {"finish_reason": finish.finish_reason,
                                "prompt_tokens": finish.prompt_tokens,
                                "generated_tokens": finish.generated_tokens,
                                "seed": prepared.params.seed}
    return event


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


class NativeRoutes:
    def __init__(self, frontend: Frontend):
        self.fe = frontend  # what a reload changes is read from it at each request

    def register(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/", self.compat_generate)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, self.fe.max_request_bytes)
        payload, headers = await self._generate(request, body)
        return json_response(payload, headers=headers)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request, self.fe.max_request_bytes)
        return await self._stream(request, body)

    async def compat_generate(self, request: web.Request) -> web.StreamResponse:
        """POST /: `stream: true` is the SSE stream, else a JSON list of one response."""
        body = await read_json_object(request, self.fe.max_request_bytes)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise validation_error("`stream` must be a boolean")
        if stream:
            return await self._stream(request, body)
        payload, headers = await self._generate(request, body)
        return json_response([payload], headers=headers)

    def _parse(self, request: web.Request, body: dict, stream: bool
               ) -> tuple[str, GenerateParams]:
        """The validated body; 403 for an adapter the caller's API key may not use."""
        inputs = parse_inputs(body)
        hub_token = self.fe.hub_token_fallback(request.headers.get("Authorization"))
        params = parse_parameters(body.get("parameters"), stream=stream, limits=self.fe.limits,
                                  bearer_token=hub_token)
        conform(body, GenerateRequest)
        authorize_adapters(request, params)
        return inputs, params

    async def _generate(self, request: web.Request, body: dict) -> tuple[dict, dict]:
        start = time.monotonic()
        inputs, params = self._parse(request, body, stream=False)
        with self.fe.limiter.slot(params.best_of):
            prepared = await prepare(self.fe.engine, inputs, params, self.fe.limits,
                                       grammars=self.fe.grammars)
            completions = await complete_all(self.fe.engine, prepared)
        finish = completions[0].finish
        inference_ms = int(finish.inference_time_s * 1000)
        headers = self._headers(prepared)
        headers.update({
            "x-generated-tokens": str(finish.generated_tokens),
            "x-total-time": _ms(time.monotonic() - start),
            "x-queue-time": _ms(finish.queue_time_s),
            "x-inference-time": str(inference_ms),
            "x-time-per-token": str(inference_ms // max(finish.generated_tokens, 1)),
        })
        return generate_json(prepared, completions), headers

    def _headers(self, prepared: Prepared | None) -> dict:
        headers = {"x-model-id": quote(self.fe.model_id, safe="/:@._-~")}
        if prepared is not None:
            headers["x-prompt-tokens"] = str(len(prepared.prompt_ids))
            if prepared.adapter_header is not None:
                headers["x-adapter-id"] = quote(prepared.adapter_header, safe="/:@,._-~")
        return headers

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        """Every error on this route, even one before any token, is a single SSE event."""
        with contextlib.ExitStack() as stack:
            try:
                inputs, params = self._parse(request, body, stream=True)
                stack.enter_context(self.fe.limiter.slot(params.best_of))
                prepared = await prepare(self.fe.engine, inputs, params, self.fe.limits,
                                       grammars=self.fe.grammars)
            except Exception as exc:  # noqa: BLE001 - rendered as the stream's one event
                return await sse.error_stream(request, error_body(as_api_error(exc)),
                                              self._headers(None))
            response = await sse.open_stream(request, self._headers(prepared))
            await self._send_tokens(response, prepared)
            return response

    async def _send_tokens(self, response: web.StreamResponse, prepared: Prepared) -> None:
        alternatives = prepared.params.sampling.num_alternatives > 0
        pump: EventPump | None = None
        last_id = 0
        try:
            pump = EventPump(self.fe.engine.generate(prepared.requests[0]))
            while True:
                token, finish = await pump.next()
                if token is not None:
                    last_id = token.token_id
                token_obj = token_json(token, alternatives) if token else _end_token(last_id)
                await sse.send(response, _stream_event(prepared, token_obj, finish))
                if finish is not None:
                    break
            await response.write_eof()
        except ConnectionResetError:
            log.debug("client left a stream; its request is cancelled")
        except Exception as exc:  # noqa: BLE001 - the stream's last event says what failed
            with contextlib.suppress(ConnectionResetError):
                await sse.send(response, error_body(as_api_error(exc)))
                await response.write_eof()
        finally:
            if pump is not None:
                await pump.aclose()

    # -- the rest ----------------------------------------------------------------------------

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, self.fe.max_request_bytes)
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise validation_error("`inputs` must be a string")
        add_special = body.get("add_special_tokens")
        if add_special is None:
            add_special = True
        if not isinstance(add_special, bool):
            raise validation_error("`add_special_tokens` must be a boolean")
        conform(body, TokenizeRequest)
        with self.fe.limiter.slot():  # tokenizing costs CPU as a prefill does: limited alike
            triples = await self.fe.engine.tokenizer.encode_with_offsets(
                inputs, add_special_tokens=add_special)
        return json_response([{"id": i, "text": inputs[start:stop], "start": start, "stop": stop}
                              for i, start, stop in triples])

    async def health(self, request: web.Request) -> web.Response:
        if getattr(self.fe.engine, "draining", False):  # a balancer should send no more
            return error_response(ApiError(503, "unavailable", "draining"))
        try:
            healthy = await self.fe.engine.health()
        except Exception:  # noqa: BLE001 - a failing check is an unhealthy server
            log.exception("health check failed")
            healthy = False
        if healthy:
            return web.Response(status=200)
        return error_response(ApiError(503, "healthcheck", "unhealthy"))

    async def info(self, request: web.Request) -> web.Response:
        info = dict(self.fe.engine.info())
        limits = self.fe.limits  # the ones in force (a reload replaces them)
        info.setdefault("max_concurrent_requests", self.fe.limiter.max_inflight)
        for key in ("max_best_of", "max_stop_sequences", "max_input_length", "max_total_tokens"):
            info.setdefault(key, getattr(limits, key))
        info.setdefault("model_id", self.fe.model_id)
        info.setdefault("adapter_source", self.fe.limits.default_adapter_source)
        info.setdefault("version", __version__)
        return json_response(info)
