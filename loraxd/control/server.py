"""The control socket: `loraxctl` asks the live engine, one JSON line per request.

The socket is created mode 0660 (the loraxd group may use it) and removed on stop. A
malformed, unknown or oversized request gets an `Error` reply; a failing handler is logged
and answered with an `Error`; neither ever reaches the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable

import msgspec

from loraxd import __version__
from loraxd.engine.adapters import LOADED, AdapterEntry, adapter_key
from loraxd.engine.request import AdapterRef
from loraxd.protocol.control import (COMMANDS, MAX_REQUEST_BYTES, AdapterFetched, AdapterInfo,
                                     AdapterList, CheckHealth, Error, GetStatus, Health,
                                     ListAdapters, PreloadAdapter, Reply, Request, Status)

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
_IDLE_TIMEOUT_S = 60.0  # a connection that sends no full line for this long is closed
_MAX_CONNECTIONS = 32


class ControlServer:
    """`engine`: an AsyncEngine; `supervisor`: the Supervisor (for `pids`)."""

    def __init__(self, path: str, engine: Any, supervisor: Any, *,
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.engine = engine
        self.supervisor = supervisor
        self._clock = clock
        self._started_at = clock()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None  # the socket file we created
        self._clients: set[asyncio.Task] = set()
        self._decoder = msgspec.json.Decoder(Request)
        self._encoder = msgspec.json.Encoder()
        self._handlers: dict[type, Callable[[Any], Awaitable[Reply]]] = {
            GetStatus: self._status, ListAdapters: self._adapters,
            PreloadAdapter: self._preload, CheckHealth: self._health}

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
            return await self._handlers[type(request)](request)
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

    # -- commands ----------------------------------------------------------------------------

    async def _status(self, _: GetStatus) -> Status:
        engine = self.engine
        stats, info = engine.stats(), engine.info()
        manager = engine.adapters
        return Status(
            version=__version__, pid=os.getpid(), model_id=str(info.get("model_id", "")),
            dtype=str(info.get("model_dtype", "")),
            device=str(info.get("model_device_type", "")),
            uptime_s=round(self._clock() - self._started_at, 3),
            worker_pids=list(self.supervisor.pids), serving=_serving(engine),
            num_running=stats["num_running"], num_waiting=stats["num_waiting"],
            kv_cache_usage=float(stats["kv_cache_usage"]), num_steps=stats["num_steps"],
            num_adapters_loaded=sum(1 for e in manager.entries.values() if e.status == LOADED),
            num_adapter_slots=len(manager.slots), num_adapters_known=len(manager.entries))

    async def _adapters(self, _: ListAdapters) -> AdapterList:
        entries = list(self.engine.adapters.entries.values())
        return AdapterList([_adapter_info(e) for e in entries])

    async def _preload(self, req: PreloadAdapter) -> Reply:
        engine = self.engine
        if getattr(engine, "sources", None) is None:
            return Error("this server serves no adapters")
        ref = AdapterRef(req.adapter_id, req.source or engine.config.adapters.adapter_source)
        manager = engine.adapters
        manager.preload(ref)
        try:
            await manager.ensure_fetched(ref)
        except Exception as exc:  # noqa: BLE001 - the fetch error, in words, is the answer
            return Error(f"adapter {adapter_key(ref)}: {exc}")
        entry = manager.entries.get(adapter_key(ref))
        if entry is None:
            return Error(f"adapter {adapter_key(ref)}: it failed to load")
        return AdapterFetched(_adapter_info(entry))

    async def _health(self, _: CheckHealth) -> Health:
        return Health(bool(await self.engine.health()))


def _adapter_info(entry: AdapterEntry) -> AdapterInfo:
    return AdapterInfo(key=entry.key, status=entry.status, slot=entry.slot,
                       num_running=entry.num_running, num_waiting=entry.num_waiting,
                       pinned=entry.pinned)


def _serving(engine: Any) -> bool:
    """Whether the engine takes requests (False while the workers restart)."""
    return bool(getattr(engine, "serving", True))
