"""Server-sent events over aiohttp's StreamResponse.

An event is `data:{json}\\n\\n` (clients strip the literal `data:`). A write to a client that
has gone raises ConnectionResetError; the caller stops generating at once. So does one to a
client that stopped reading, once server.stream_write_timeout_s has passed without a byte
taken (WriteWatch): it is dropped, and its batch slot and KV pages are freed. The daemon runs
the app with `handler_cancellation=True` (app.make_runner) so that a client that leaves
while no token is being written also cancels its handler, and with it the engine request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, Coroutine, Mapping

from aiohttp import web

from loraxd.http.bodies import dumps
from loraxd.http.service import door_settings

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"  # OpenAI streams end with this; the native stream never sends it

# The kernel's send buffer of a stream (it doubles it): past it, bytes a client does not take
# wait in the server, where WriteWatch sees them, after kilobytes of tokens rather than the
# megabytes autotuning allows. Still ample for a token stream's rate.
STREAM_SEND_BUFFER_BYTES = 16 * 1024


class StalledClient(ConnectionResetError):
    """A client that left written data unread past stream_write_timeout_s: dropped, and
    handled as one that left (its request is cancelled)."""


class WriteWatch:
    """Drops a stream's client once no written byte has left the server for `timeout_s`,
    whether its data waits queued or a write is blocked on full buffers. A slow client that
    keeps taking bytes is never dropped."""

    def __init__(self, transport: Any, timeout_s: float):
        self.transport = transport
        self.timeout_s = timeout_s
        self.queued = 0  # bytes queued when last looked at
        self.stalled_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def guard(self, write: Coroutine[Any, Any, None], num_bytes: int) -> None:
        """Runs `write` of `num_bytes` (its framing not counted) under the watch."""
        try:
            self._check()
        except StalledClient:
            write.close()  # never started
            raise
        # What the queue holds once the write is in, if the client takes nothing meanwhile:
        # a write that waits on full buffers and then ends has seen the client take bytes.
        self.queued += num_bytes
        # No task per write (tokens are many): a timer looks at the queue while the write
        # waits, and ends the wait through the timeout once the client has stalled.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:
                self._timer = loop.call_later(self.timeout_s / 4, self._tick, loop, deadline)
                try:
                    await write
                finally:
                    self._timer.cancel()
        except TimeoutError:
            self._drop()
        self._observe()  # took bytes during the write? the queue is the next mark

    def _tick(self, loop: asyncio.AbstractEventLoop, deadline: asyncio.Timeout) -> None:
        try:
            self._check(drop=False)
        except StalledClient:
            deadline.reschedule(loop.time())  # the waiting write raises TimeoutError now
            return
        self._timer = loop.call_later(self.timeout_s / 4, self._tick, loop, deadline)

    def _check(self, drop: bool = True) -> None:
        """Raises StalledClient (after dropping the client, when `drop`) once it has taken
        nothing for timeout_s."""
        self._observe()
        if (self.stalled_since is not None
                and time.monotonic() - self.stalled_since >= self.timeout_s):
            if drop:
                self._drop()
            raise StalledClient(f"client took nothing for {self.timeout_s:g} s")

    def _observe(self) -> None:
        """Notes whether the client took bytes since the queue was last looked at."""
        queued = self._queued()
        if queued == 0 or queued < self.queued:
            self.stalled_since = None  # the client took bytes: it is reading
        elif self.stalled_since is None:
            self.stalled_since = time.monotonic()
        self.queued = queued

    def _queued(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _drop(self) -> None:
        log.info("a stream's client took nothing for %g s; dropped", self.timeout_s)
        if self.transport is not None:
            self.transport.abort()  # close() would wait to flush what it will never read
        raise StalledClient(f"client took nothing for {self.timeout_s:g} s")


class EventStream(web.StreamResponse):
    """A StreamResponse whose writes (and final flush) are guarded by a WriteWatch."""

    watch: WriteWatch | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.watch is None:
            return await super().write(data)
        await self.watch.guard(super().write(data), len(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if self.watch is None:
            return await super().write_eof(data)
        await self.watch.guard(super().write_eof(data), len(data))


def _shrink_send_buffer(transport: Any) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)


async def open_stream(request: web.Request,
                      headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    response = EventStream(status=200, headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # no proxy buffering in front of a token stream
        **(headers or {}),
    })
    settings = door_settings(request)  # a reload's timeout applies to the next stream
    if settings is not None:
        _shrink_send_buffer(request.transport)
        response.watch = WriteWatch(request.transport, settings.stream_write_timeout_s)
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, obj: Any, prefix: str = "data:") -> None:
    await response.write(format_event(obj, prefix))


async def send_raw(response: web.StreamResponse, data: bytes) -> None:
    await response.write(data)


def format_event(obj: Any, prefix: str = "data:") -> bytes:
    return f"{prefix}{dumps(obj)}\n\n".encode()


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
