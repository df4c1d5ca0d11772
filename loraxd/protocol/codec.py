"""msgpack framing for the worker socket: one message per frame, one decoder per direction."""
from __future__ import annotations

import msgspec

from loraxd.protocol.worker import FromWorker, ToWorker, WorkerOptions

# Bump when a message changes shape; Hello carries it and the scheduler refuses a mismatch.
PROTOCOL_VERSION = 4

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def decode_to_worker(frame: bytes) -> ToWorker:
    return _to_worker.decode(frame)


def decode_from_worker(frame: bytes) -> FromWorker:
    return _from_worker.decode(frame)


def encode_options(options: WorkerOptions) -> str:
    """The worker's start-up options as its one command-line argument (JSON)."""
    return msgspec.json.encode(options).decode()


def decode_options(text: str) -> WorkerOptions:
    return msgspec.json.decode(text, type=WorkerOptions)


DecodeError = msgspec.DecodeError
