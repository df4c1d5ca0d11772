"""Server-sent events over aiohttp's StreamResponse.

An event is `data:{json}\\n\\n` (clients strip the literal `data:`). A write to a client that
has gone raises ConnectionResetError; the caller stops generating at once. The daemon runs
the app with `handler_cancellation=True` (app.make_runner) so that a client that leaves
while no token is being written also cancels its handler, and with it the engine request.
"""
from __future__ import annotations

from typing import Any, Mapping

from aiohttp import web

from loraxd.http.bodies import dumps

DONE = b"data: [DONE]\n\n"  # OpenAI streams end with this; the native stream never sends it


def format_event(obj: Any, prefix: str = "data:") -> bytes:
    return f"{prefix}{dumps(obj)}\n\n".encode()


async def open_stream(request: web.Request,
                      headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # no proxy buffering in front of a token stream
        **(headers or {}),
    })
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, obj: Any, prefix: str = "data:") -> None:
    await response.write(format_event(obj, prefix))


async def send_raw(response: web.StreamResponse, data: bytes) -> None:
    await response.write(data)


async def error_stream(request: web.Request, error_body: Mapping[str, str],
                       headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """A whole stream that is one error event (an error before any token)."""
    response = await open_stream(request, headers)
    try:
        await send(response, error_body)
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response
