"""A reload puts every reloadable setting into the object that reads it, in one swap."""
from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

from loraxd.config import Config
from loraxd.daemon.reload import apply
from loraxd.engine.adapters import AdapterManager
from loraxd.engine.request import AdapterRef
from loraxd.engine.scheduler import SchedulerLimits
from loraxd.http.schemas import Limits
from loraxd.http.service import InflightLimiter


def tree(**sections) -> Config:
    base = Config()
    return Config(**{f.name: dataclasses.replace(getattr(base, f.name), **sections.get(f.name, {}))
                     for f in dataclasses.fields(Config)})


async def test_every_live_setting_reaches_its_reader():
    old = tree(adapters={"adapter_source": "local", "preloaded_adapter_ids": ("keep", "drop")})
    loaded = []

    async def fetch(ref):
        return "/adapters/" + ref.adapter_id

    async def load(slot, entry):
        loaded.append(entry.key)
    manager = AdapterManager(num_slots=4, cycle_time_s=2.0, fetch=fetch, load=load,
                             on_failed=lambda key, error: None, wake=lambda: None)
    engine = SimpleNamespace(
        config=old, scheduler=SimpleNamespace(limits=SchedulerLimits(4096, 1.2, 20)),
        adapters=manager, sources=SimpleNamespace(local_adapter_dirs=()),
        fetcher=SimpleNamespace(timeout_s=300.0))
    for adapter_id in old.adapters.preloaded_adapter_ids:
        manager.preload(AdapterRef(adapter_id, "local"))
    frontend = SimpleNamespace(limits=Limits.from_config(old), limiter=InflightLimiter(128))
    supervisor = SimpleNamespace(config=old)
    new = tree(
        server={"log_level": "warning"},
        scheduler={"max_concurrent_requests": 7, "max_best_of": 1, "max_stop_sequences": 2,
                   "max_input_length": 100, "max_total_tokens": 200,
                   "max_batch_prefill_tokens": 300, "waiting_served_ratio": 0.5,
                   "max_waiting_tokens": 5},
        adapters={"adapter_source": "local", "adapter_cycle_time_s": 9.0,
                  "local_adapter_dirs": ("/srv/adapters",),
                  "preloaded_adapter_ids": ("keep", "new"), "adapter_fetch_timeout_s": 30.0},
        worker={"ready_timeout_s": 60.0})
    level = logging.getLogger().level
    try:
        apply(new, old=old, engine=engine, frontend=frontend, supervisor=supervisor)
        assert logging.getLogger().level == logging.WARNING
    finally:
        logging.getLogger().setLevel(level)
    assert engine.config is new and supervisor.config is new
    assert engine.scheduler.limits == SchedulerLimits(300, 0.5, 5)
    assert frontend.limiter.max_inflight == 7
    assert frontend.limits == Limits(max_best_of=1, max_stop_sequences=2, max_input_length=100,
                                     max_total_tokens=200, default_adapter_source="local")
    assert manager.cycle_time_s == 9.0 and engine.fetcher.timeout_s == 30.0
    assert engine.sources.local_adapter_dirs == ("/srv/adapters",)
    pinned = {key: entry.pinned for key, entry in manager.entries.items()}
    assert pinned == {"local:keep": True, "local:drop": False, "local:new": True}

