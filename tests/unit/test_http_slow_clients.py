"""Slow and greedy clients, through the runner the daemon serves with (make_runner): a
client that stops reading a stream is dropped after the write timeout; a request head
trickled byte by byte (slowloris) is cut off at the head deadline; a reload's new timeouts
apply to the next connection and request."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import pytest
from aiohttp import web

from loraxd.http.app import FRONTEND_KEY, make_app, make_runner
from tests.unit.test_http_native import PROMPT, FakeEngine, make_config


@pytest.fixture
async def served():
    runners = []

    async def start(engine, **server):
        long_streams = {"max_input_length": 32, "max_total_tokens": 100_000}
        app = make_app(engine, make_config(server=server, scheduler=long_streams))
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        start.frontend = app[FRONTEND_KEY]
        return runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes `sock` (reading everything it sent meanwhile)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        while True:
            try:
                if not await loop.sock_recv(sock, 65536):
                    return time.monotonic() - start
            except ConnectionResetError:
                return time.monotonic() - start


def tiny_client(port: int) -> socket.socket:
    """A client with a small receive buffer (set before connecting, so the window is small)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


class CountingEngine(FakeEngine):
    """Endless 4 kB tokens; counts them."""

    def __init__(self, **kwargs):
        self.num_tokens = 0
        super().__init__(pieces=("x" * 4000,), forever=True, delay=0.002,
                         logprob_of=self._count, **kwargs)

    def _count(self, req, n):
        self.num_tokens += 1
        return -0.25


@pytest.mark.parametrize("path,body", [
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 5000}}),
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "max_tokens": 5000}),
])
async def test_a_client_that_stops_reading_is_dropped(served, path, body):
    engine = CountingEngine()
    port = await served(engine, stream_write_timeout_s=0.5)
    sock = tiny_client(port)
    sock.sendall(request_bytes(path, body))
    async with asyncio.timeout(10):  # never read: the server's buffers fill, then it waits
        while not engine.closed:
            await asyncio.sleep(0.05)
    assert len(engine.requests) == 1
    assert engine.num_tokens < 2500  # cut off long before its 5000 tokens (20 MB)
    assert await closed_by_server(sock, 5) < 5  # and the connection dropped
    sock.close()


async def test_a_slow_but_reading_client_is_not_dropped(served):
    """It takes a token's 4 kB every 5 ms, slower than the engine writes them, so the
    server's buffers stay full and its writes wait on the client for the whole stream,
    which lasts twice the timeout and more. The timeout is still far above the pauses a
    loaded machine puts between two reads: only a client that stops would meet it."""
    engine = CountingEngine()
    port = await served(engine, stream_write_timeout_s=1.0)
    sock = tiny_client(port)
    sock.sendall(request_bytes("/generate_stream", {"inputs": PROMPT,
                                                    "parameters": {"max_new_tokens": 400}}))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    received = b""
    start = time.monotonic()
    async with asyncio.timeout(30):
        while not received.endswith(b"0\r\n\r\n"):  # the last chunk of the response
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "closed early"
            received += chunk
            await asyncio.sleep(0.005)
    assert time.monotonic() - start > 2.0
    assert engine.num_tokens == 400 and b'"generated_text":"xxx' in received
    sock.close()


async def test_slowloris_is_cut_off_at_the_head_deadline(served):
    port = await served(FakeEngine(), header_read_timeout_s=0.5)
    sock = socket.create_connection(("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    start = time.monotonic()
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    closed = False
    for byte in head:  # one byte every 50 ms: it would take 50 s
        try:
            await loop.sock_sendall(sock, bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        await asyncio.sleep(0.05)
        if time.monotonic() - start > 3:
            break
    if not closed:
        assert await closed_by_server(sock, 1) is not None
    assert time.monotonic() - start < 2.5
    sock.close()


async def test_the_head_deadline_spares_requests_and_idle_keepalive(served):
    """A stream longer than the deadline goes through; the connection then idles past the
    deadline, still open (the keep-alive timeout is aiohttp's, much longer); a slow head
    sent on it later is cut at the deadline from its first byte."""
    engine = FakeEngine(delay=0.4)
    port = await served(engine, header_read_timeout_s=0.5)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request_bytes("/generate_stream", {"inputs": PROMPT}))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(10):  # the whole stream, 1.2 s, came through
        while not received.endswith(b"0\r\n\r\n"):
            received += await loop.sock_recv(sock, 65536)
    assert b'"generated_text":"Hello world"' in received
    with pytest.raises(TimeoutError):  # idle for twice the deadline: still open
        await closed_by_server(sock, 1.2)
    start = time.monotonic()
    await loop.sock_sendall(sock, b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # then stalls
    await closed_by_server(sock, 3)
    assert 0.3 < time.monotonic() - start < 1.5
    sock.close()


async def slowloris(port: int, within: float) -> bool:
    """Whether a head trickled one byte per 50 ms is cut off within `within` seconds."""
    sock = socket.create_connection(("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    start = time.monotonic()
    try:
        for byte in b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            try:
                await loop.sock_sendall(sock, bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return True
            await asyncio.sleep(0.05)
            if time.monotonic() - start > within:
                return False
        return False
    finally:
        sock.close()


async def test_a_reload_shortens_the_timeouts_of_the_next_connections(served):
    """What loraxd.daemon.reload.apply does: the frontend's settings replaced whole."""
    engine = CountingEngine()
    port = await served(engine, header_read_timeout_s=30.0, stream_write_timeout_s=30.0,
                        body_read_timeout_s=30.0)
    assert not await slowloris(port, within=1.5)  # 30 s: still sending
    frontend = served.frontend
    frontend.settings = dataclasses.replace(frontend.settings, header_read_timeout_s=0.5,
                                            stream_write_timeout_s=0.5, body_read_timeout_s=0.3)
    assert await slowloris(port, within=2.5)

    body = json.dumps({"inputs": PROMPT}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    writer.close()

    sock = tiny_client(port)
    sock.sendall(request_bytes("/generate_stream", {"inputs": PROMPT,
                                                    "parameters": {"max_new_tokens": 5000}}))
    async with asyncio.timeout(10):  # never read: dropped after 0.5 s, not 30 s
        while not engine.closed:
            await asyncio.sleep(0.05)
    assert engine.num_tokens < 2500
    sock.close()
