"""A blocking client for the control socket: one request, one reply, a timeout.

Imports only the standard library, msgspec and `loraxd.protocol.control`, so `loraxctl`
starts fast. Every way of not getting an answer raises `ControlError` with a sentence a
person can act on.
"""
from __future__ import annotations

import socket

import msgspec

from loraxd.protocol.control import MAX_REPLY_BYTES, Reply, Request


class ControlError(Exception):
    """No reply could be had: the daemon is not running, not reachable, too slow, or the
    socket is not ours to use."""


class Unreachable(ControlError):
    """Nothing answers: no socket, nobody listening on it, or no reply in time."""


class ControlClient:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Reply)

    def request(self, request: Request) -> Reply:
        """The daemon's reply; an `Error` reply is returned, not raised."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                try:
                    sock.sendall(self._encoder.encode(request) + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a refused peer: the daemon said why and closed; read it
                line = self._read_line(sock)
        except FileNotFoundError:
            raise Unreachable(f"loraxd is not running: there is no control socket at "
                               f"{self.path}") from None
        except ConnectionRefusedError:
            raise Unreachable(f"loraxd is not running: nothing answers on {self.path}") \
                from None
        except PermissionError:
            raise ControlError(f"permission denied on {self.path}: run as root or as a "
                               "member of the loraxd group") from None
        except TimeoutError:
            raise Unreachable(f"loraxd did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise Unreachable(f"cannot talk to loraxd on {self.path}: "
                               f"{exc.strerror or exc}") from None
        try:
            return self._decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise ControlError(f"loraxd sent a reply this loraxctl does not understand "
                               f"({exc}); are the versions the same?") from None

    @staticmethod
    def _read_line(sock: socket.socket) -> bytes:
        chunks, size = [], 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):  # one reply per request: its newline ends it
                break
            if size > MAX_REPLY_BYTES:
                raise ControlError(f"loraxd's reply is over {MAX_REPLY_BYTES} bytes")
        if not chunks:
            raise Unreachable("loraxd closed the control connection without a reply")
        return b"".join(chunks)
