"""HTTP errors: one exception type, one JSON body shape, one middleware.

Every error leaves as `{"error": str, "error_type": str}` (LoRAX's error shape). Handlers raise
`ApiError` (or let an engine `EngineError` through); the middleware renders both, turns
aiohttp's own HTTP exceptions into the same shape, and turns anything unexpected into a
500 `incomplete_generation` that is logged, never aiohttp's HTML page.
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from loraxd.engine.request import EngineError
from loraxd.http.metrics_recorder import note_error

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def validation_error(what: str) -> ApiError:
    return ApiError(422, "validation", f"Input validation error: {what}")


def bad_request(what: str) -> ApiError:
    return ApiError(400, "bad_request", what)


def overloaded() -> ApiError:
    return ApiError(429, "overloaded", "Model is overloaded")


def as_api_error(exc: BaseException) -> ApiError:
    """Any exception as the ApiError the client sees (and the request metrics count);
    unexpected ones are logged here."""
    err = _as_api_error(exc)
    note_error(err.error_type, err.message)
    return err


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineError):
        return ApiError(exc.status, exc.error_type, str(exc) or exc.error_type)
    log.exception("internal error while serving a request", exc_info=exc)
    return ApiError(500, "incomplete_generation", f"internal error: {type(exc).__name__}")


def error_body(err: ApiError) -> dict:
    return {"error": err.message, "error_type": err.error_type}


def error_response(err: ApiError) -> web.Response:
    text = json.dumps(error_body(err), ensure_ascii=False)
    return web.Response(text=text, status=err.status, content_type="application/json")


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return bad_request("request body is over the size limit")
    if exc.status == 404:
        return ApiError(404, "not_found", "not found")
    if exc.status == 405:
        return ApiError(405, "method_not_allowed", "method not allowed")
    return ApiError(exc.status, "bad_request" if exc.status < 500 else "incomplete_generation",
                    exc.reason or "error")


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc))
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response
    except ConnectionResetError:
        raise  # the client is gone; there is nobody to answer
    except Exception as exc:  # noqa: BLE001 - the last line of defence, logged in as_api_error
        return error_response(as_api_error(exc))
