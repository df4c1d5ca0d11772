"""Putting a reloaded configuration tree into force.

`apply()` swaps the tree in every part that holds it and pushes each reloadable setting to
the object that reads it. It never awaits, so on the one event loop no request, step or
command sees half of the old tree and half of the new. The settings are the ones marked
`reload=True` in loraxd.config.tree; a restart-only setting is never touched here.
drain_timeout_s is read from the service's tree, which the caller swaps.
"""
from __future__ import annotations

import logging
from typing import Any

from loraxd.config import Config
from loraxd.engine.adapters import adapter_key
from loraxd.engine.request import AdapterRef
from loraxd.engine.scheduler import SchedulerLimits
from loraxd.http.schemas import Limits
from loraxd.http.settings import DoorSettings
from loraxd.logs import set_level

log = logging.getLogger(__name__)


def apply(new: Config, *, old: Config, engine: Any, frontend: Any, supervisor: Any) -> None:
    sched, adapters = new.scheduler, new.adapters
    engine.config = new
    engine.scheduler.limits = SchedulerLimits.from_config(sched)
    engine.adapters.cycle_time_s = adapters.adapter_cycle_time_s
    if engine.sources is not None:
        engine.sources.local_adapter_dirs = tuple(adapters.local_adapter_dirs)
        engine.fetcher.timeout_s = adapters.adapter_fetch_timeout_s  # read at each download
        _preloads(engine.adapters, old.adapters, adapters)
    frontend.limits = Limits.from_config(new)
    frontend.limiter.max_inflight = sched.max_concurrent_requests
    frontend.settings = DoorSettings.from_config(new)  # the HTTP timeouts, read per request
    supervisor.config = new  # ready_timeout_s, read at each start of the workers
    set_level(new.server.log_level)
    engine.set_worker_log_level(new.server.log_level)  # sent to every rank before its next step


def _preloads(manager: Any, old: Any, new: Any) -> None:
    """Newly listed adapters are loaded and pinned; ones taken off the list are unpinned
    (they rotate out like any other; `loraxctl adapters unload` frees their slot now)."""
    wanted = {adapter_key(AdapterRef(i, new.adapter_source)): i
              for i in new.preloaded_adapter_ids}
    dropped = {adapter_key(AdapterRef(i, old.adapter_source))
               for i in old.preloaded_adapter_ids} - set(wanted)
    for key in dropped:
        if key in manager.entries:
            manager.unpin(key)
    for adapter_id in wanted.values():
        manager.preload(AdapterRef(adapter_id, new.adapter_source))
