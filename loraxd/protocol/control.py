"""Messages between `loraxctl` and the daemon's control socket.

One JSON object per line in each direction over a Unix socket, so a person can talk to it
with `socat - UNIX-CONNECT:/run/loraxd/control.sock`:

    > {"command": "status"}
    < {"type": "status", "version": "0.1.0", "model_id": "...", ...}

A request names its `command`; a reply names its `type`, and every failure is an `error`
reply. The server decodes `Request`, the client decodes `Reply`.
"""
from __future__ import annotations

from typing import Any

import msgspec

# The longest request line the server reads; a longer one gets an error and the connection
# is closed. Replies (an adapter list) may be longer; the client caps them at MAX_REPLY_BYTES.
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024


def _request(tag: str):
    return {"tag": tag, "tag_field": "command", "frozen": True, "forbid_unknown_fields": True}


# -- loraxctl -> daemon ----------------------------------------------------------------------


class GetStatus(msgspec.Struct, **_request("status")):
    pass


class CheckHealth(msgspec.Struct, **_request("health")):
    pass


class GetVersion(msgspec.Struct, **_request("version")):
    pass


class ListWorkers(msgspec.Struct, **_request("workers")):
    pass


class ListAdapters(msgspec.Struct, **_request("adapters")):
    pass


class LoadAdapter(msgspec.Struct, **_request("adapter_load")):
    """Fetch the adapter and load it into a slot; answered once it is loaded (or failed, or
    `wait_s` passed). `pin`: it never rotates out of its slot."""

    adapter_id: str
    source: str | None = None  # None: the daemon's adapters.adapter_source
    pin: bool = False
    wait_s: float = 60.0


class UnloadAdapter(msgspec.Struct, **_request("adapter_unload")):
    """Free the adapter's slot and forget it; refused while requests use or wait for it."""

    adapter_id: str
    source: str | None = None


class UnpinAdapter(msgspec.Struct, **_request("adapter_unpin")):
    """Let a pinned adapter rotate out of its slot like any other."""

    adapter_id: str
    source: str | None = None


class ListRequests(msgspec.Struct, **_request("requests")):
    pass


class CancelRequest(msgspec.Struct, **_request("cancel")):
    request_id: int


class Drain(msgspec.Struct, **_request("drain")):
    """New generation requests get 503 from now on; running ones finish. `wait_s` > 0:
    answered once none is left (or that many seconds passed)."""

    wait_s: float = 0.0


class Resume(msgspec.Struct, **_request("resume")):
    pass


class Reload(msgspec.Struct, **_request("reload")):
    pass


class ShowConfig(msgspec.Struct, **_request("config_show")):
    pass


class CheckConfig(msgspec.Struct, **_request("config_check")):
    """Read and validate the configuration as a reload would, and apply nothing."""


class SetLogLevel(msgspec.Struct, **_request("log_level")):
    level: str | None = None  # None: only tell the level in force


Request = (GetStatus | CheckHealth | GetVersion | ListWorkers | ListAdapters | LoadAdapter
           | UnloadAdapter | UnpinAdapter | ListRequests | CancelRequest | Drain | Resume
           | Reload | ShowConfig | CheckConfig | SetLogLevel)
COMMANDS = tuple(cls.__struct_config__.tag for cls in Request.__args__)

# -- daemon -> loraxctl ----------------------------------------------------------------------


class Status(msgspec.Struct, tag="status", frozen=True):
    version: str
    pid: int
    state: str  # starting | serving | draining | restarting | stopping
    serving: bool  # takes new requests: state is serving
    model_id: str
    dtype: str
    device: str
    url: str  # where the HTTP API listens
    uptime_s: float
    worker_pids: list[int]
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of the KV pages in use, 0..1
    num_steps: int
    num_adapters_loaded: int
    num_adapter_slots: int
    num_adapters_known: int
    config_file: str | None
    num_pending_restart: int  # settings changed in the file that wait for a restart


class Health(msgspec.Struct, tag="health", frozen=True):
    healthy: bool
    state: str  # serving, or why not: draining | restarting | stopping | unhealthy


class Version(msgspec.Struct, tag="version", frozen=True):
    version: str
    pid: int
    python: str


class WorkerInfo(msgspec.Struct, frozen=True):
    rank: int
    pid: int | None
    device: str
    state: str  # starting | ready | stopped | zombie | exited
    rss_bytes: int
    uptime_s: float
    restarts: int
    weight_bytes: int = 0  # this rank's shard of the weights, once ready
    kv_cache_bytes: int = 0
    device_total_bytes: int = 0  # CUDA only: the rank's GPU, from NVML, now
    device_free_bytes: int = 0
    device_name: str = ""
    device_used_bytes: int = 0
    gpu_utilization: float | None = None  # 0..1, from NVML; None on a CPU or where it cannot say
    gpu_memory_utilization: float | None = None


class WorkerList(msgspec.Struct, tag="workers", frozen=True):
    workers: list[WorkerInfo]


class AdapterInfo(msgspec.Struct, frozen=True):
    key: str  # "<source>:<adapter_id>", or a merge recipe
    status: str  # fetching | fetched | loading | loaded | quarantined
    slot: int  # -1: in no device slot
    num_running: int
    num_waiting: int
    pinned: bool
    error: str | None = None  # why it is quarantined


class AdapterList(msgspec.Struct, tag="adapters", frozen=True):
    adapters: list[AdapterInfo]


class AdapterState(msgspec.Struct, tag="adapter", frozen=True):
    """The adapter after a load, pin or unpin."""

    adapter: AdapterInfo


class AdapterUnloaded(msgspec.Struct, tag="adapter_unloaded", frozen=True):
    key: str


class RequestInfo(msgspec.Struct, frozen=True):
    request_id: int
    state: str  # running | waiting
    adapter: str  # "" for the base model
    prompt_tokens: int
    generated_tokens: int
    max_new_tokens: int
    age_s: float


class RequestList(msgspec.Struct, tag="requests", frozen=True):
    requests: list[RequestInfo]


class RequestCancelled(msgspec.Struct, tag="cancelled", frozen=True):
    request_id: int


class DrainState(msgspec.Struct, tag="drain", frozen=True):
    state: str  # serving | draining | stopping
    num_requests: int  # still running or waiting


class SettingChange(msgspec.Struct, frozen=True):
    key: str  # section.name
    old: Any
    new: Any


class Reloaded(msgspec.Struct, tag="reloaded", frozen=True):
    config_file: str | None
    applied: list[SettingChange]  # in force now
    pending_restart: list[SettingChange]  # read, waiting for a restart


class ConfigChecked(msgspec.Struct, tag="config_checked", frozen=True):
    """A valid file: what a reload would apply now, and what would wait for a restart."""

    config_file: str | None
    applied: list[SettingChange]
    pending_restart: list[SettingChange]


class Setting(msgspec.Struct, frozen=True):
    key: str  # section.name
    value: Any  # in force
    reloadable: bool
    pending: str = ""  # "restart" or "reload": the file says `pending_value`, not yet applied
    pending_value: Any = None


class ConfigShown(msgspec.Struct, tag="config", frozen=True):
    config_file: str | None
    settings: list[Setting]
    file_error: str | None = None  # the file as it is now does not load: nothing is pending


class LogLevel(msgspec.Struct, tag="log_level", frozen=True):
    level: str


class Error(msgspec.Struct, tag="error", frozen=True):
    error: str


Reply = (Status | Health | Version | WorkerList | AdapterList | AdapterState | AdapterUnloaded
         | RequestList | RequestCancelled | DrainState | Reloaded | ConfigChecked | ConfigShown
         | LogLevel | Error)
