"""GET /metrics: Prometheus text format 0.0.4 (JSON when asked for and no text is acceptable).

Two kinds of series: those recorded as requests, steps and adapter moves happen
(metrics_series.py, metrics_recorder.py) and gauges read from the live engine at each
scrape (metrics_scrape.py). The README lists them all.
"""
from __future__ import annotations

from typing import Any, Callable

from aiohttp import web
from prometheus_client import generate_latest

from loraxd.http.bodies import json_response
from loraxd.http.metrics_recorder import MeteredEngine, Recorder
from loraxd.http.metrics_scrape import EngineGauges, GpuGauges, snapshot
from loraxd.http.metrics_series import AdapterLabels, Series

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def wants_json(accept: str) -> bool:
    """JSON only when asked for and no Prometheus text format is acceptable."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "application/json" in types and not types & {"text/plain",
                                                         "application/openmetrics-text"}


class Metrics:
    """Everything /metrics serves for one app, and the hooks that record it."""

    def __init__(self, engine: Any, config: Any, gpus: Callable[[], list] | None = None):
        """`gpus`: each CUDA rank's GPU now (Supervisor.gpus); None: no GPU series."""
        sched, server = config.scheduler, config.server
        self.engine = engine
        self.model_id = config.model.model_id
        self.max_labeled = server.metrics_adapter_labels
        self.series = Series(max_input_length=sched.max_input_length,
                             max_total_tokens=sched.max_total_tokens)
        self.series.registry.register(EngineGauges(engine, self.model_id, self.max_labeled))
        if gpus is not None:
            self.series.registry.register(GpuGauges(gpus))
        self.recorder = Recorder(self.series, AdapterLabels(self.model_id, self.max_labeled),
                                 engine)
        self.recorder.attach()

    def metered(self, engine: Any) -> MeteredEngine:
        return MeteredEngine(engine, self.recorder)

    def middleware(self):
        return self.recorder.middleware()

    def render_text(self) -> str:
        exact = "".join(c.render() for c in self.series.exact_counters())
        return exact + generate_latest(self.series.registry).decode()

    def register(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)

    async def metrics(self, request: web.Request) -> web.Response:
        if wants_json(request.headers.get("Accept", "")):
            return json_response(snapshot(self.engine, self.model_id,
                                          max_labeled=self.max_labeled).to_json())
        return web.Response(body=self.render_text().encode(),
                            headers={"Content-Type": TEXT_CONTENT_TYPE})
