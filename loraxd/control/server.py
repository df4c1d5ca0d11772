"""The control socket: `loraxctl` asks the live daemon, one JSON line per request.

The socket is created mode 0660 (the loraxd group may use it) and removed on stop; each
connection's peer credentials are checked (peers.py). A malformed, unknown or oversized
request gets an `Error` reply; a failing command is logged and answered with an `Error`;
neither ever reaches the event loop. What each command does is in commands.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from typing import Any

import msgspec

from loraxd.control.peers import PeerPolicy, peer_of
from loraxd.protocol.control import COMMANDS, MAX_REQUEST_BYTES, Error, Reply, Request

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_IDLE_TIMEOUT_S = 60.0  # a connection that sends no full line for this long is closed
_MAX_CONNECTIONS = 32


class ControlServer:
    """`commands`: has `async handle(request) -> Reply` (commands.Commands)."""

    def __init__(self, path: str, commands: Any, *, policy: PeerPolicy | None = None):
        self.path = path
        self.commands = commands
        self.policy = policy  # None: the socket file's group, once it exists
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None  # the socket file we created
        self._clients: set[asyncio.Task] = set()
        self._decoder = msgspec.json.Decoder(Request)
        self._encoder = msgspec.json.Encoder()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._refuse_live_socket()
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=self.path, limit=MAX_REQUEST_BYTES)
            os.chmod(self.path, SOCKET_MODE)
        except OSError as exc:
            raise OSError(exc.errno, f"control socket {self.path}: {exc.strerror or exc}") \
                from exc
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        if self.policy is None:
            self.policy = PeerPolicy(group=st.st_gid)
        log.info("control socket on %s", self.path)

    async def _refuse_live_socket(self) -> None:
        """A socket file someone still answers on belongs to another daemon: leave it be."""
        try:
            if not stat.S_ISSOCK(os.stat(self.path).st_mode):
                return  # bind fails with a clear error
        except FileNotFoundError:
            return
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_unix_connection(self.path)
        except (OSError, TimeoutError):
            return  # stale: start_unix_server replaces it
        writer.close()
        raise OSError(errno.EADDRINUSE,
                      f"control socket {self.path}: another loraxd is answering on it")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._inode is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    # -- connections -------------------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            if len(self._clients) > _MAX_CONNECTIONS:
                await self._send(writer, Error(f"too many control connections "
                                               f"(at most {_MAX_CONNECTIONS})"))
                return
            refusal = self._refusal(writer)
            if refusal is not None:
                log.warning("control connection refused: %s", refusal)
                await self._send(writer, Error(refusal))
                return
            while await self._serve_line(reader, writer):
                pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_line(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> bool:
        """Answer one request line; False when the connection should close."""
        try:
            async with asyncio.timeout(_IDLE_TIMEOUT_S):
                line = await reader.readline()
        except ValueError:  # the line went over the reader's limit
            await self._send(writer, Error(f"request line over {MAX_REQUEST_BYTES} bytes"))
            return False
        if not line:
            return False
        if line.strip():
            await self._send(writer, await self.handle(line))
        return line.endswith(b"\n")

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        try:
            peer = peer_of(writer.get_extra_info("socket"))
        except (OSError, AttributeError) as exc:
            return f"permission denied: the peer's credentials are unknown ({exc})"
        return self.policy.refusal(peer)

    async def _send(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        writer.write(self._encoder.encode(reply) + b"\n")
        await writer.drain()

    async def handle(self, line: bytes) -> Reply:
        """One request line in, one reply out; never raises."""
        try:
            request = self._decoder.decode(line)
        except msgspec.DecodeError as exc:
            return Error(self._explain(line, exc))
        try:
            return await self.commands.handle(request)
        except Exception as exc:  # noqa: BLE001 - a failing command must not end the daemon
            log.exception("control command %s failed", type(request).__name__)
            return Error(f"internal error: {exc}")

    @staticmethod
    def _explain(line: bytes, exc: msgspec.DecodeError) -> str:
        if not isinstance(exc, msgspec.ValidationError):
            return f"malformed request: {exc}"
        raw = msgspec.json.decode(line)
        command = raw.get("command") if isinstance(raw, dict) else None
        if isinstance(command, str) and command not in COMMANDS:
            return f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}"
        return f"invalid request: {exc}"
