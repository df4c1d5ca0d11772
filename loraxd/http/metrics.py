"""GET /metrics: the engine's state at scrape time, as Prometheus text (or JSON).

Every value is read from the live engine when the scrape arrives; nothing is kept between
scrapes. Besides loraxd's own `loraxd_*` names, the gauges an inference gateway reads from
a vLLM server (see DESIGN.md, "Beyond one host") are served under vLLM's names:

    vllm:num_requests_waiting, vllm:num_requests_running,
    vllm:gpu_cache_usage_perc (a fraction 0..1, as vLLM; also as vllm:kv_cache_usage_perc),
    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters} <unix time>

Adapter lists name adapters by id, comma-separated. Merged adapters are left out of them
(no one id names them), and so is an adapter first fetched with an API token (as from
/v1/models): it may be private.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from loraxd.http.bodies import json_response

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def to_json(self) -> dict:
        return {"model_id": self.model_id, "num_requests_waiting": self.num_waiting,
                "num_requests_running": self.num_running,
                "kv_cache_usage": self.kv_cache_usage, "num_steps": self.num_steps,
                "max_lora": self.num_adapter_slots, "num_adapters_loaded":
                self.num_adapters_loaded, "running_lora_adapters": self.running_adapters,
                "waiting_lora_adapters": self.waiting_adapters}


def snapshot(engine: Any, model_id: str, clock: Callable[[], float] = time.time) -> Snapshot:
    """Read the engine; anything an engine (or a test's fake) lacks reads as zero."""
    stats_of = getattr(engine, "stats", None)
    stats = stats_of() if callable(stats_of) else {}
    manager = getattr(engine, "adapters", None)
    entries = list((getattr(manager, "entries", None) or {}).values())
    slots = getattr(manager, "slots", None) or []
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
        time_s=clock())


def _names(entries) -> list[str]:
    """Adapter ids, each once, in order: the names a request's `model` may use. Merges
    (no single id) and adapters fetched with a token are left out."""
    names: dict[str, None] = {}
    for entry in entries:
        ref = getattr(entry, "ref", None)
        adapter_id = getattr(ref, "adapter_id", None)
        if adapter_id and not getattr(ref, "api_token", None):
            names[adapter_id] = None
    return list(names)


# -- Prometheus text format 0.0.4 -------------------------------------------------------------


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _family(name: str, kind: str, help_text: str, value: float,
            labels: dict[str, str] | None = None) -> str:
    label_text = ""
    if labels:
        label_text = "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"
    return (f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} {kind}\n"
            f"{name}{label_text} {_number(value)}\n")


def render_text(s: Snapshot) -> str:
    model = {"model_name": s.model_id}
    lora = {"max_lora": str(s.num_adapter_slots),
            "running_lora_adapters": ",".join(s.running_adapters),
            "waiting_lora_adapters": ",".join(s.waiting_adapters)}
    lora_help = "Adapter slots and the adapters of running and waiting requests; value: unix time"
    usage_help = "Fraction of the KV cache pages in use (0..1)"
    families = [
        ("loraxd_requests_waiting", "gauge", "Requests waiting in the queue", s.num_waiting, None),
        ("loraxd_requests_running", "gauge", "Requests in the running batch", s.num_running,
         None),
        ("loraxd_kv_cache_usage_ratio", "gauge", usage_help, s.kv_cache_usage, None),
        ("loraxd_steps_total", "counter", "Forward steps run", s.num_steps, None),
        ("loraxd_adapter_slots", "gauge", "Device slots for adapters", s.num_adapter_slots,
         None),
        ("loraxd_adapters_loaded", "gauge", "Adapters loaded in a slot", s.num_adapters_loaded,
         None),
        ("loraxd_lora_requests_info", "gauge", lora_help, s.time_s, lora),
        ("vllm:num_requests_waiting", "gauge", "Requests waiting in the queue", s.num_waiting,
         model),
        ("vllm:num_requests_running", "gauge", "Requests in the running batch", s.num_running,
         model),
        ("vllm:gpu_cache_usage_perc", "gauge", usage_help, s.kv_cache_usage, model),
        ("vllm:kv_cache_usage_perc", "gauge", usage_help, s.kv_cache_usage, model),
        ("vllm:lora_requests_info", "gauge", lora_help, s.time_s, lora),
    ]
    return "".join(_family(*f) for f in families)


# -- the route --------------------------------------------------------------------------------


def wants_json(accept: str) -> bool:
    """JSON only when asked for and no Prometheus text format is acceptable."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "application/json" in types and not types & {"text/plain",
                                                         "application/openmetrics-text"}


class MetricsRoutes:
    def __init__(self, engine: Any, model_id: str):
        self.engine = engine
        self.model_id = model_id

    def register(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)

    async def metrics(self, request: web.Request) -> web.Response:
        snap = snapshot(self.engine, self.model_id)
        if wants_json(request.headers.get("Accept", "")):
            return json_response(snap.to_json())
        return web.Response(body=render_text(snap).encode(),
                            headers={"Content-Type": TEXT_CONTENT_TYPE})
