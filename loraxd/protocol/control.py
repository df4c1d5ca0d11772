"""Messages between `loraxctl` and the daemon's control socket.

One JSON object per line in each direction over a Unix socket, so a person can talk to it
with `socat - UNIX-CONNECT:/run/loraxd/control.sock`:

    > {"command": "status"}
    < {"type": "status", "version": "0.1.0", "model_id": "...", ...}

A request names its `command`; a reply names its `type`, and every failure is an `error`
reply. The server decodes `Request`, the client decodes `Reply`.
"""
from __future__ import annotations

import msgspec

# The longest request line the server reads; a longer one gets an error and the connection
# is closed. Replies (an adapter list) may be longer; the client caps them at MAX_REPLY_BYTES.
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024

# -- loraxctl -> daemon ----------------------------------------------------------------------


class GetStatus(msgspec.Struct, tag="status", tag_field="command", frozen=True):
    pass


class ListAdapters(msgspec.Struct, tag="adapters", tag_field="command", frozen=True):
    pass


class PreloadAdapter(msgspec.Struct, tag="load", tag_field="command", frozen=True):
    """Fetch, load and pin an adapter; answered once its files are on disk."""

    adapter_id: str
    source: str | None = None  # None: the daemon's adapters.adapter_source


class CheckHealth(msgspec.Struct, tag="health", tag_field="command", frozen=True):
    pass


Request = GetStatus | ListAdapters | PreloadAdapter | CheckHealth
COMMANDS = ("status", "adapters", "load", "health")

# -- daemon -> loraxctl ----------------------------------------------------------------------


class Status(msgspec.Struct, tag="status", frozen=True):
    version: str
    pid: int
    model_id: str
    dtype: str
    device: str
    uptime_s: float
    worker_pids: list[int]
    serving: bool
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of the KV pages in use, 0..1
    num_steps: int
    num_adapters_loaded: int
    num_adapter_slots: int
    num_adapters_known: int


class AdapterInfo(msgspec.Struct, frozen=True):
    key: str  # "<source>:<adapter_id>", or a merge recipe
    status: str  # fetching | fetched | loading | loaded
    slot: int  # -1: in no device slot
    num_running: int
    num_waiting: int
    pinned: bool


class AdapterList(msgspec.Struct, tag="adapters", frozen=True):
    adapters: list[AdapterInfo]


class AdapterFetched(msgspec.Struct, tag="load", frozen=True):
    adapter: AdapterInfo


class Health(msgspec.Struct, tag="health", frozen=True):
    healthy: bool


class Error(msgspec.Struct, tag="error", frozen=True):
    error: str


Reply = Status | AdapterList | AdapterFetched | Health | Error
