"""The gauges read from the live engine when a scrape arrives; nothing is kept between scrapes.

Besides loraxd's own `loraxd_*` names, LoRAX's batch and queue gauges, and the gauges an
inference gateway (Gateway API Inference Extension) reads from a vLLM server, under vLLM's
names:

    vllm:num_requests_waiting, vllm:num_requests_running,
    vllm:kv_cache_usage_perc (a fraction 0..1, as vLLM; also as vllm:gpu_cache_usage_perc),
    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters} <unix time>

And each adapter's tier, so that a router can prefer the replica that already holds one:
`device` (loaded in a slot), `host` (in every worker's host-memory LRU: a load without the
disk), `disk` (downloaded only). Adapters still downloading or quarantined have no tier.

`GpuGauges`: each CUDA rank's GPU (labels `rank`, and `gpu`: NVML's UUID), read from NVML at
each scrape; no series at all on a CPU, nor for what NVML cannot read now.

Adapter lists and labels name adapters by id. Merged adapters are left out of them (no one
id names them), and so is an adapter first fetched with an API token: it may be private.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TIERS = ("device", "host", "disk")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reports."""

    model_id: str
    num_waiting: int
    num_running: int
    kv_cache_usage: float  # 0..1
    num_steps: int
    num_adapter_slots: int
    num_adapters_loaded: int
    running_adapters: list[str]
    waiting_adapters: list[str]
    time_s: float
    batch_max_tokens: int = 0
    kv_pages_used: int = 0  # in pages, so a leak of one page shows (the ratio rounds it)
    kv_pages_cached: int = 0  # unused, kept for the prefix cache
    num_preempted: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_held: int = 0  # requests the engine holds a stream for, whatever their state
    tiers: dict[str, str] = field(default_factory=dict)  # adapter id -> tier, public ones
    tier_counts: dict[str, int] = field(default_factory=dict)  # tier -> adapters, all of them

    def to_json(self) -> dict:
        return {"model_id": self.model_id, "num_requests_waiting": self.num_waiting,
                "num_requests_running": self.num_running,
                "kv_cache_usage": self.kv_cache_usage, "num_steps": self.num_steps,
                "max_lora": self.num_adapter_slots, "num_adapters_loaded":
                self.num_adapters_loaded, "running_lora_adapters": self.running_adapters,
                "waiting_lora_adapters": self.waiting_adapters,
                "adapter_tiers": self.tiers, "num_kv_pages_used": self.kv_pages_used,
                "num_kv_pages_cached": self.kv_pages_cached,
                "num_preempted": self.num_preempted,
                "prefix_queried_tokens": self.prefix_queried_tokens,
                "prefix_hit_tokens": self.prefix_hit_tokens,
                "num_requests_held": self.num_held}


def _public_id(entry: Any) -> str | None:
    """The id a request's `model` may use; None for merges and adapters fetched with a token."""
    ref = getattr(entry, "ref", None)
    adapter_id = getattr(ref, "adapter_id", None)
    return adapter_id if adapter_id and not getattr(ref, "api_token", None) else None


def _names(entries) -> list[str]:
    """Public adapter ids, each once, in order."""
    return list(dict.fromkeys(i for i in map(_public_id, entries) if i is not None))


def tier_of(entry: Any, host_cached: frozenset[str]) -> str | None:
    status = getattr(entry, "status", "")
    if status == "loaded":
        return "device"
    if status not in ("fetched", "loading"):
        return None  # fetching (nowhere yet) or quarantined
    path = getattr(entry, "path", None)
    paths = [str(p) for p in path] if isinstance(path, list) else [str(path)]
    held = getattr(entry, "key", None) in host_cached or all(p in host_cached for p in paths)
    return "host" if held else "disk"


def snapshot(engine: Any, model_id: str, clock: Callable[[], float] = time.time,
             max_labeled: int | None = None) -> Snapshot:
    """Read the engine; anything an engine (or a test's fake) lacks reads as zero. At most
    `max_labeled` adapters are named in `tiers`, the nearest tiers first."""
    stats_of = getattr(engine, "stats", None)
    stats = stats_of() if callable(stats_of) else {}
    manager = getattr(engine, "adapters", None)
    entries = list((getattr(manager, "entries", None) or {}).values())
    slots = getattr(manager, "slots", None) or []
    host_cached = getattr(engine, "host_cached", frozenset())
    tiers: dict[str, str] = {}
    counts = dict.fromkeys(TIERS, 0)
    for entry in entries:
        tier = tier_of(entry, host_cached)
        if tier is not None:
            counts[tier] += 1
            adapter_id = _public_id(entry)
            if adapter_id is not None:
                tiers[adapter_id] = tier
    ordered = sorted(tiers.items(), key=lambda item: TIERS.index(item[1]))
    return Snapshot(
        model_id=model_id,
        num_waiting=int(stats.get("num_waiting", 0)),
        num_running=int(stats.get("num_running", 0)),
        kv_cache_usage=float(stats.get("kv_cache_usage", 0.0)),
        num_steps=int(stats.get("num_steps", 0)),
        num_adapter_slots=len(slots),
        num_adapters_loaded=sum(1 for e in entries if getattr(e, "status", "") == "loaded"),
        running_adapters=_names(e for e in entries if getattr(e, "num_running", 0) > 0),
        waiting_adapters=_names(e for e in entries if getattr(e, "num_waiting", 0) > 0),
        time_s=clock(),
        batch_max_tokens=int(stats.get("batch_max_tokens", 0)),
        kv_pages_used=int(stats.get("num_kv_pages_used", 0)),
        kv_pages_cached=int(stats.get("num_kv_pages_cached", 0)),
        num_preempted=int(stats.get("num_preempted", 0)),
        prefix_queried_tokens=int(stats.get("prefix_queried_tokens", 0)),
        prefix_hit_tokens=int(stats.get("prefix_hit_tokens", 0)),
        num_held=int(stats.get("num_requests_held", 0)),
        tiers=dict(ordered[:max_labeled] if max_labeled is not None else ordered),
        tier_counts=counts)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None):
    family = GaugeMetricFamily(name, doc, labels=list(labels or ()))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name: str, doc: str, value: float, labels: dict[str, str]):
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class EngineGauges:
    """A prometheus-client collector: one Snapshot per scrape, as gauges."""

    def __init__(self, engine: Any, model_id: str, max_labeled: int):
        self.engine, self.model_id, self.max_labeled = engine, model_id, max_labeled

    def collect(self):
        s = snapshot(self.engine, self.model_id, max_labeled=self.max_labeled)
        model = {"model_name": s.model_id}
        lora = {"max_lora": str(s.num_adapter_slots),
                "running_lora_adapters": ",".join(s.running_adapters),
                "waiting_lora_adapters": ",".join(s.waiting_adapters)}
        lora_doc = ("Adapter slots and the adapters of running and waiting requests; value: "
                    "unix time")
        usage = "Fraction of the KV cache pages in use (0..1)"
        yield _gauge("loraxd_requests_waiting", "Requests waiting in the queue", s.num_waiting)
        yield _gauge("loraxd_requests_running", "Requests in the running batch", s.num_running)
        yield _gauge("loraxd_kv_cache_usage_ratio", usage, s.kv_cache_usage)
        yield _gauge("loraxd_kv_pages_used", "KV cache pages allocated to sequences",
                     s.kv_pages_used)
        yield _gauge("loraxd_kv_pages_cached", "KV cache pages no sequence uses, kept for "
                     "the prefix cache", s.kv_pages_cached)
        preempted = "Sequences preempted when the KV cache ran out (resumed later)"
        yield CounterMetricFamily("loraxd_preemptions", preempted, value=s.num_preempted)
        yield _gauge("loraxd_requests_held", "Requests the engine holds (running, waiting, or "
                     "their last event unread)", s.num_held)
        yield CounterMetricFamily("loraxd_steps", "Forward steps run", value=s.num_steps)
        yield _gauge("loraxd_adapter_slots", "Device slots for adapters", s.num_adapter_slots)
        yield _gauge("loraxd_adapters_loaded", "Adapters loaded in a slot",
                     s.num_adapters_loaded)
        yield _gauge("loraxd_lora_requests_info", lora_doc, s.time_s, lora)
        yield _gauge("lorax_queue_size", "Requests waiting in the queue", s.num_waiting)
        yield _gauge("lorax_batch_current_size", "Sequences in the running batch", s.num_running)
        yield _gauge("lorax_batch_current_max_tokens",
                     "Tokens the running batch may reach (prompt + max_new_tokens of each)",
                     s.batch_max_tokens)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting in the queue",
                     s.num_waiting, model)
        yield _gauge("vllm:num_requests_running", "Requests in the running batch",
                     s.num_running, model)
        yield _gauge("vllm:kv_cache_usage_perc", usage, s.kv_cache_usage, model)
        yield _gauge("vllm:gpu_cache_usage_perc", usage + " (vLLM's older name)",
                     s.kv_cache_usage, model)
        yield _gauge("vllm:lora_requests_info", lora_doc, s.time_s, lora)
        yield _counter("vllm:num_preemptions", preempted, s.num_preempted, model)
        yield _counter("vllm:prefix_cache_queries", "Context tokens looked up in the prefix "
                       "cache", s.prefix_queried_tokens, model)
        yield _counter("vllm:prefix_cache_hits", "Context tokens found in the prefix cache",
                       s.prefix_hit_tokens, model)
        by_tier = GaugeMetricFamily("loraxd_adapters_by_tier",
                                    "Adapters in each tier (device slot, host memory, disk)",
                                    labels=["tier"])
        for tier in TIERS:
            by_tier.add_metric([tier], s.tier_counts.get(tier, 0))
        yield by_tier
        tier_family = GaugeMetricFamily(
            "loraxd_adapter_tier", "1 for the tier each adapter is in: device (a slot), host "
            "(host memory), disk", labels=["adapter", "tier"])
        for adapter_id, tier in s.tiers.items():
            tier_family.add_metric([adapter_id, tier], 1)
        yield tier_family


class GpuGauges:
    """A prometheus-client collector of `read()`: RankGpu records (loraxd/daemon/gpu_usage.py).
    A read that fails leaves the GPU series out of this scrape, never the scrape itself."""

    def __init__(self, read: Callable[[], list]):
        self.read = read
        self._failed = False  # logged once with its traceback; later ones at debug

    def collect(self):
        try:
            gpus = list(self.read())
        except Exception:  # noqa: BLE001 - NVML's own errors are handled below this
            log.log(logging.DEBUG if self._failed else logging.WARNING,
                    "the GPUs cannot be read: no GPU series in this scrape", exc_info=True)
            self._failed = True
            return
        labels = ["rank", "gpu"]
        used = GaugeMetricFamily("loraxd_gpu_memory_used_bytes",
                                 "Memory in use on the rank's GPU, by any process (NVML)",
                                 labels=labels)
        total = GaugeMetricFamily("loraxd_gpu_memory_total_bytes",
                                  "Memory of the rank's GPU (NVML)", labels=labels)
        busy = GaugeMetricFamily("loraxd_gpu_utilization_ratio",
                                 "Share of NVML's last sample period a kernel ran on the "
                                 "rank's GPU (0..1)", labels=labels)
        memory_busy = GaugeMetricFamily("loraxd_gpu_memory_utilization_ratio",
                                        "Share of NVML's last sample period the rank's GPU "
                                        "memory was read or written (0..1)", labels=labels)
        for gpu in gpus:
            key = [str(gpu.rank), gpu.uuid]
            used.add_metric(key, gpu.used_bytes)
            total.add_metric(key, gpu.total_bytes)
            if gpu.utilization is not None:
                busy.add_metric(key, gpu.utilization.gpu)
                memory_busy.add_metric(key, gpu.utilization.memory)
        yield from (f for f in (used, total, busy, memory_busy) if f.samples)  # no empty HELP
