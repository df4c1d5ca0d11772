"""JSON in and out: request bodies (400 when they are not JSON) and JSON responses."""
from __future__ import annotations

import json
from typing import Any, Mapping

from aiohttp import web

from loraxd.http.errors import bad_request, validation_error


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def json_response(obj: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(obj), status=status, headers=headers,
                        content_type="application/json")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The parsed body; 400 for a wrong content type, an oversized body or malformed JSON.

    `max_bytes` is server.max_request_bytes, which make_app also gives aiohttp as
    client_max_size, so a chunked body is cut off while it is read.
    """
    if request.content_type != "application/json":
        raise bad_request(f"expected Content-Type application/json, got {request.content_type}")
    if request.content_length is not None and request.content_length > max_bytes:
        raise bad_request(f"request body is over the size limit of {max_bytes} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise bad_request(f"request body is over the size limit of {max_bytes} bytes") from None
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON: {exc}") from None


async def read_json_object(request: web.Request, max_bytes: int) -> dict:
    body = await read_json(request, max_bytes)
    if not isinstance(body, dict):
        raise validation_error("the request body must be a JSON object")
    return body

