"""A deadline on request heads (slowloris): a connection that has not sent a whole request
line and headers within server.header_read_timeout_s of connecting, or of the first byte
of a later request on a keep-alive connection, is closed. An idle keep-alive connection is
left to aiohttp's keep-alive timeout (75 s): longer than clients keep pooled connections
(aiohttp 15 s, httpx 5 s), so a client rarely sends a request just as the server closes.

aiohttp has no such deadline of its own, so each connection's aiohttp protocol is wrapped
(`HeadDeadline`) and the app's outermost middleware tells the wrapper when a request has
arrived and when it is done (`head_deadline_middleware`). Serve the app through
`DeadlineRunner` (app.make_runner). The timeout is asked for at each arming, so a reload's
value applies to new connections, and to open ones from their next response on.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiohttp import web

log = logging.getLogger(__name__)


class HeadDeadline(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol for the connection; closes the transport
    when the deadline passes with no request being handled."""

    def __init__(self, inner: Any, timeout_s: Callable[[], float], registry: dict):
        self.inner = inner
        self.timeout_s = timeout_s  # the setting in force
        self.armed_s = 0.0  # what the running timer was armed with
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.num_active = 0
        self.idle = False  # between requests on a keep-alive connection

    # -- the deadline -----------------------------------------------------------------------

    def arm(self) -> None:
        self.disarm()
        self.armed_s = self.timeout_s()
        self.timer = asyncio.get_running_loop().call_later(self.armed_s, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def request_started(self) -> None:
        self.num_active += 1
        self.idle = False
        self.disarm()

    def request_done(self) -> None:
        self.num_active -= 1
        if self.num_active == 0:
            self.idle = True  # the next request's first byte arms the deadline

    def _expire(self) -> None:
        self.timer = None
        if self.num_active == 0 and self.transport is not None:
            log.debug("no request head within %g s; connection closed", self.armed_s)
            self.transport.abort()

    # -- asyncio.Protocol, forwarded ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.registry[self.inner] = self
        self.arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.transport = None
        self.registry.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.idle and self.num_active == 0 and self.transport is not None:
            self.idle = False
            self.arm()  # a new head started: it has the deadline from its first byte
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


HEAD_DEADLINES = web.AppKey("head_deadlines", dict)  # aiohttp protocol -> its HeadDeadline


def head_deadline_middleware(registry: dict):
    @web.middleware
    async def head_arrived(request: web.Request, handler) -> web.StreamResponse:
        deadline = registry.get(request.protocol)
        if deadline is None:  # not served through DeadlineRunner (tests' TestServer)
            return await handler(request)
        deadline.request_started()
        try:
            return await handler(request)
        finally:
            deadline.request_done()
    return head_arrived


class DeadlineRunner(web.AppRunner):
    """An AppRunner whose connections get the head deadline, whatever site serves it
    (sites build each connection's protocol from `runner.server`)."""

    def __init__(self, app: web.Application, *, header_read_timeout_s: Callable[[], float],
                 **kwargs: Any):
        super().__init__(app, **kwargs)
        self.header_read_timeout_s = header_read_timeout_s  # asked at each arming

    @property
    def server(self) -> Any:
        make_protocol = super().server
        if make_protocol is None:
            return None
        registry = self.app[HEAD_DEADLINES]
        return lambda: HeadDeadline(make_protocol(), self.header_read_timeout_s, registry)
