"""A reload puts every reloadable setting into the object that reads it, in one swap.

The test goes through Service.reload (what SIGHUP and `loraxctl reload` run) with a tree that
changes every setting marked `reload=True`, and reads each one back where the daemon reads
it: a setting newly marked reloadable fails here until it has a reader below.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

from aiohttp.test_utils import make_mocked_request

import pytest

from loraxd.config import Config, ConfigError
from loraxd.config.changes import settings
from loraxd.config.tree import reloadable
from loraxd.daemon.devices import KvBounds
from loraxd.daemon.service import Service
from loraxd.engine.adapters import AdapterManager
from loraxd.engine.request import AdapterRef
from loraxd.engine.scheduler import SchedulerLimits
from loraxd.http.app import FRONTEND_KEY, make_app, make_runner
from loraxd.http.service import door_settings
from loraxd.logs import current_level


def tree(**sections) -> Config:
    base = Config()
    return Config(**{f.name: dataclasses.replace(getattr(base, f.name), **sections.get(f.name, {}))
                     for f in dataclasses.fields(Config)})


class FakeEngine:
    """What a reload touches of AsyncEngine, and what Service.summary reads."""

    serving = True

    def __init__(self, config: Config, manager: AdapterManager):
        self.config = config
        self.scheduler = SimpleNamespace(limits=SchedulerLimits(4096, 1.2, 20))
        self.adapters = manager
        self.sources = SimpleNamespace(local_adapter_dirs=())
        self.fetcher = SimpleNamespace(timeout_s=300.0)
        self.worker_log_level: str | None = None

    def set_worker_log_level(self, level: str) -> None:
        self.worker_log_level = level

    def stats(self) -> dict:
        return {"num_waiting": 0, "num_running": 0, "kv_cache_usage": 0.0, "num_steps": 0}


def manager_with(preloaded: tuple[str, ...], source: str) -> AdapterManager:
    async def fetch(ref):
        return "/adapters/" + ref.adapter_id

    async def load(slot, entry):
        pass
    manager = AdapterManager(num_slots=4, cycle_time_s=2.0, fetch=fetch, load=load,
                             on_failed=lambda key, error: None, wake=lambda: None)
    for adapter_id in preloaded:
        manager.preload(AdapterRef(adapter_id, source))
    return manager


def readers(service: Service, runner) -> dict:
    """Each reloadable setting: the values its readers use now."""
    engine, frontend, manager = service.engine, service.frontend, service.engine.adapters
    request = make_mocked_request("POST", "/generate", app=service.app)

    def limit(name: str):
        return lambda: [getattr(frontend.limits, name)]

    def sched(name: str):
        return lambda: [getattr(engine.scheduler.limits, name)]

    def step_loop(name: str):  # the step loop reads the engine's tree at every step
        return lambda: [getattr(engine.config.worker, name)]

    def restarts(name: str):  # the supervisor reads its tree at every restart
        return lambda: [getattr(service.supervisor.config.worker, name)]
    return {
        "server.log_level": lambda: [current_level(), engine.worker_log_level],
        "server.drain_timeout_s": lambda: [service.config.server.drain_timeout_s],
        "server.stream_write_timeout_s": lambda: [door_settings(request).stream_write_timeout_s],
        "server.header_read_timeout_s": lambda: [runner.header_read_timeout_s()],
        "server.body_read_timeout_s": lambda: [door_settings(request).body_read_timeout_s],
        "scheduler.max_concurrent_requests": lambda: [frontend.limiter.max_inflight],
        "scheduler.max_best_of": limit("max_best_of"),
        "scheduler.max_stop_sequences": limit("max_stop_sequences"),
        "scheduler.max_input_length": limit("max_input_length"),
        "scheduler.max_total_tokens": limit("max_total_tokens"),
        "scheduler.max_batch_prefill_tokens": sched("max_batch_prefill_tokens"),
        "scheduler.waiting_served_ratio": sched("waiting_served_ratio"),
        "scheduler.max_waiting_tokens": sched("max_waiting_tokens"),
        "scheduler.prefill_chunk_tokens": sched("prefill_chunk_tokens"),
        "adapters.adapter_source": lambda: [frontend.limits.default_adapter_source,
                                            service.config.adapters.adapter_source],
        "adapters.adapter_cycle_time_s": lambda: [manager.cycle_time_s],
        "adapters.local_adapter_dirs": lambda: [engine.sources.local_adapter_dirs],
        "adapters.preloaded_adapter_ids": lambda: [tuple(
            key.split(":", 1)[1] for key, entry in manager.entries.items() if entry.pinned)],
        "adapters.adapter_fetch_timeout_s": lambda: [engine.fetcher.timeout_s],
        "worker.ready_timeout_s": lambda: [service.supervisor.config.worker.ready_timeout_s],
        **{f"worker.{name}": step_loop(name) for name in (
            "step_timeout_floor_s", "step_timeout_factor", "heartbeat_interval_s",
            "heartbeat_timeout_s")},
        **{f"worker.{name}": restarts(name) for name in (
            "max_restarts", "restart_window_s", "restart_backoff_s")},
    }


async def test_every_live_setting_reaches_its_reader():
    old = tree(adapters={"adapter_source": "s3", "preloaded_adapter_ids": ("keep", "drop")})
    new = tree(
        server={"log_level": "warning", "drain_timeout_s": 5.0, "stream_write_timeout_s": 3.0,
                "header_read_timeout_s": 2.0, "body_read_timeout_s": 4.0},
        scheduler={"max_concurrent_requests": 7, "max_best_of": 1, "max_stop_sequences": 2,
                   "max_input_length": 100, "max_total_tokens": 200,
                   "max_batch_prefill_tokens": 300, "waiting_served_ratio": 0.5,
                   "max_waiting_tokens": 5, "prefill_chunk_tokens": 48},
        adapters={"adapter_source": "local", "adapter_cycle_time_s": 9.0,
                  "local_adapter_dirs": ("/srv/adapters",),
                  "preloaded_adapter_ids": ("keep", "new"), "adapter_fetch_timeout_s": 30.0},
        worker={"ready_timeout_s": 60.0, "step_timeout_floor_s": 3.0, "step_timeout_factor": 4.0,
                "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 6.0, "max_restarts": 2,
                "restart_window_s": 60.0, "restart_backoff_s": 0.1})
    service = Service(old, Path("/nonexistent"), config_file=None, read_config=lambda: new)
    service.engine = FakeEngine(old, manager_with(old.adapters.preloaded_adapter_ids, "s3"))
    service.app = make_app(service.engine, old)
    service.frontend = service.app[FRONTEND_KEY]
    service.supervisor = SimpleNamespace(config=old, kv_bounds=KvBounds(None, None))
    service._reload_lock = asyncio.Lock()
    runner = make_runner(service.app)
    live = {f"{section}.{name}" for section, name, _ in settings(old)
            if reloadable(section, name)}
    probes = readers(service, runner)
    assert set(probes) == live, "every reloadable setting needs a reader checked here"
    level = logging.getLogger().level
    try:
        plan = await service.reload()
        assert {change.key for change in plan.applied} == live  # the test changes them all
        for section, name, value in settings(new):
            key = f"{section}.{name}"
            if key in live:
                assert probes[key]() == [value] * len(probes[key]()), key
    finally:
        logging.getLogger().setLevel(level)
    assert service.config == new and service.engine.config is service.config
    assert service.supervisor.config is service.config
    assert not any(entry.pinned for key, entry in service.engine.adapters.entries.items()
                   if key.startswith("s3:"))  # off the list: they rotate out like any other


@pytest.mark.parametrize("bounds, scheduler, refused", [
    (KvBounds(1024, 4096, "GPU memory"), {"max_input_length": 1000, "max_total_tokens": 2048},
     "max_total_tokens = 2048: more than the 1024 tokens the KV cache holds"),
    (KvBounds(None, 2048), {"max_batch_prefill_tokens": 4096},
     "max_batch_prefill_tokens = 4096: the GPU memory was shared out at start for steps of "
     "2048"),
])
async def test_a_reload_must_fit_the_kv_cache_the_workers_sized(bounds, scheduler, refused):
    """An unset max_batch_total_tokens is what the workers sized at start: a reload may not
    ask the scheduler for more, nor for larger steps than the activations' headroom."""
    old = tree(scheduler={"max_input_length": 512, "max_total_tokens": 1024,
                          "max_batch_prefill_tokens": 1024})
    new = tree(scheduler={**dataclasses.asdict(old.scheduler), **scheduler})
    service = Service(old, Path("/nonexistent"), config_file=None, read_config=lambda: new)
    service.engine = FakeEngine(old, manager_with((), "hub"))
    service.supervisor = SimpleNamespace(config=old, kv_bounds=bounds)
    service._reload_lock = asyncio.Lock()
    with pytest.raises(ConfigError, match=refused):
        await service.reload()
    assert service.config is old
