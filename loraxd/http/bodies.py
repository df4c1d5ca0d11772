"""JSON in and out: request bodies (400 when they are not JSON) and JSON responses."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping

import msgspec
from aiohttp import web

from loraxd.http.errors import bad_request, validation_error
from loraxd.http.service import door_settings


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(obj), status=status, headers=headers,
                        content_type="application/json")


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The parsed body; 400 for a wrong content type, an oversized body or malformed JSON.

    `max_bytes` is server.max_request_bytes, which make_app also gives aiohttp as
    client_max_size, so a chunked body is cut off while it is read; the whole body must
    arrive within server.body_read_timeout_s.
    """
    if request.content_type != "application/json":
        raise bad_request(f"expected Content-Type application/json, got {request.content_type}")
    if request.content_length is not None and request.content_length > max_bytes:
        raise bad_request(f"request body is over the size limit of {max_bytes} bytes")
    settings = door_settings(request)  # a reload's timeout applies to the next body
    timeout_s = settings.body_read_timeout_s if settings is not None else None
    try:
        async with asyncio.timeout(timeout_s):  # a body trickled in byte by byte ends here
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise bad_request(f"request body is over the size limit of {max_bytes} bytes") from None
    except TimeoutError:
        raise bad_request(f"request body not received within {timeout_s:g} s") from None
    # msgspec, not json: it refuses lone surrogates (text no tokenizer or encoder takes)
    # and NaN/Infinity, and a nesting too deep is a RecursionError caught here.
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise bad_request(f"malformed JSON: {exc}") from None


async def read_json_object(request: web.Request, max_bytes: int) -> dict:
    body = await read_json(request, max_bytes)
    if not isinstance(body, dict):
        raise validation_error("the request body must be a JSON object")
    return body

