"""loraxctl's human output: the daemon's replies as short texts and aligned tables."""
from __future__ import annotations

import json
from typing import Any

from loraxd.protocol.control import (AdapterInfo, AdapterList, AdapterState, AdapterUnloaded,
                                     ConfigChecked, ConfigShown, DrainState, Health, LogLevel,
                                     Reloaded, RequestCancelled, RequestList, SettingChange,
                                     Status, Version, WorkerList)


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [head, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in lines)


def duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"
    return f"{days}d {text}" if days else text


def size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def value(v: Any) -> str:
    return "(unset)" if v is None else json.dumps(v)


def status(r: Status) -> str:
    rows = [("state", r.state),
            ("model", f"{r.model_id} ({r.dtype} on {r.device})"),
            ("listening", r.url),
            ("pid", str(r.pid)),
            ("uptime", duration(r.uptime_s)),
            ("workers", " ".join(map(str, r.worker_pids)) or "none running"),
            ("requests", f"{r.num_running} running, {r.num_waiting} waiting"),
            ("kv cache", f"{100 * r.kv_cache_usage:.1f}% used"),
            ("steps", str(r.num_steps)),
            ("adapters", f"{r.num_adapters_loaded} loaded in {r.num_adapter_slots} slots, "
                         f"{r.num_adapters_known} known"),
            ("config", (r.config_file or "defaults") + (
                f" ({r.num_pending_restart} setting(s) pending restart)"
                if r.num_pending_restart else ""))]
    return "\n".join([f"loraxd {r.version}"] + [f"{k:<10} {v}" for k, v in rows])


def health(r: Health) -> str:
    return "healthy" if r.healthy else f"unhealthy ({r.state})" if r.state != "unhealthy" \
        else "unhealthy"


def version(r: Version, client_version: str) -> str:
    return f"loraxctl {client_version}\nloraxd {r.version} (pid {r.pid}, python {r.python})"


def workers(r: WorkerList) -> str:
    """MEMORY: the process's resident memory; WEIGHTS and KV: the rank's shard of each;
    GPU: free/total memory of its GPU now, and its name; UTIL: the share of NVML's last
    sample period a kernel ran on it, then the share its memory was busy (from NVML)."""
    def maybe(n: int) -> str:
        return size(n) if n else "-"

    def device_free(w) -> str:
        total = w.device_total_bytes
        return f"{size(w.device_free_bytes)}/{size(total)}" if total else "-"

    def busy(w) -> str:
        if w.gpu_utilization is None or w.gpu_memory_utilization is None:
            return "-"
        return f"{100 * w.gpu_utilization:.0f}%/{100 * w.gpu_memory_utilization:.0f}%"

    return table(("RANK", "PID", "DEVICE", "STATE", "MEMORY", "WEIGHTS", "KV", "GPU",
                  "UTIL", "UPTIME", "RESTARTS", "GPU NAME"),
                 [(str(w.rank), "-" if w.pid is None else str(w.pid), w.device or "-",
                   w.state, maybe(w.rss_bytes), maybe(w.weight_bytes), maybe(w.kv_cache_bytes),
                   device_free(w), busy(w), duration(w.uptime_s), str(w.restarts),
                   w.device_name or "-") for w in r.workers])


def adapters(r: AdapterList) -> str:
    if not r.adapters:
        return "no adapters"
    return table(("ADAPTER", "STATUS", "SLOT", "RUNNING", "WAITING", "PINNED"),
                 [(a.key, a.status, "-" if a.slot < 0 else str(a.slot), str(a.num_running),
                   str(a.num_waiting), "yes" if a.pinned else "no") for a in r.adapters])


def adapter(a: AdapterInfo) -> str:
    where = f" in slot {a.slot}" if a.slot >= 0 else ""
    return (f"adapter {a.key}: {a.status}{where}" + (", pinned" if a.pinned else "")
            + (f" ({a.error})" if a.error else ""))


def adapter_state(r: AdapterState) -> str:
    return adapter(r.adapter)


def adapter_unloaded(r: AdapterUnloaded) -> str:
    return f"adapter {r.key} unloaded"


def requests(r: RequestList) -> str:
    if not r.requests:
        return "no requests"
    return table(("ID", "STATE", "ADAPTER", "PROMPT", "GENERATED", "MAX_NEW", "AGE"),
                 [(str(q.request_id), q.state, q.adapter or "(base)", str(q.prompt_tokens),
                   str(q.generated_tokens), str(q.max_new_tokens), f"{q.age_s:.1f}s")
                  for q in r.requests])


def cancelled(r: RequestCancelled) -> str:
    return f"request {r.request_id} cancelled"


def drain(r: DrainState) -> str:
    if r.state == "serving":
        return f"serving; {r.num_requests} request(s) in flight"
    if r.num_requests:
        return f"{r.state}: {r.num_requests} request(s) still running"
    return f"{r.state}: no request left"


def _changes(title: str, changes: list[SettingChange]) -> list[str]:
    if not changes:
        return []
    return [title] + [f"  {c.key}: {value(c.old)} -> {value(c.new)}" for c in changes]


def reloaded(r: Reloaded) -> str:
    lines = [f"reloaded {r.config_file or '(no file: defaults)'}"]
    lines += _changes("applied:", r.applied) or ["nothing to apply"]
    lines += _changes("pending restart:", r.pending_restart)
    return "\n".join(lines)


def config_checked(r: ConfigChecked) -> str:
    lines = [f"configuration valid: {r.config_file or '(no file: defaults)'}"]
    lines += _changes("a reload would apply:", r.applied)
    lines += _changes("waiting for a restart:", r.pending_restart)
    return "\n".join(lines)


def config_shown(r: ConfigShown) -> str:
    lines = [f"# {r.config_file or 'no file: defaults'}, as in force"]
    if r.file_error:
        lines.append(f"# the file does not load now: {r.file_error}")
    section = None
    for s in r.settings:
        head, name = s.key.split(".", 1)
        if head != section:
            lines.append(f"\n[{head}]")
            section = head
        line = f"{name} = {value(s.value)}"
        if s.pending:
            line += f"  # pending {s.pending}: {value(s.pending_value)}"
        lines.append(line)
    return "\n".join(lines)


def log_level(r: LogLevel) -> str:
    return r.level


SHOW = {Status: status, Health: health, WorkerList: workers, AdapterList: adapters,
        AdapterState: adapter_state, AdapterUnloaded: adapter_unloaded,
        RequestList: requests, RequestCancelled: cancelled, DrainState: drain,
        Reloaded: reloaded, ConfigChecked: config_checked, ConfigShown: config_shown,
        LogLevel: log_level}
