"""What each control command does, against the running daemon (`loraxd.daemon.service`).

`service` offers: `engine` (AsyncEngine), `supervisor`, `state`, `uptime_s`, `url`,
`config`, `config_file`, `drain()`, `resume()`, `wait_drained(s)`, `reload()`,
`read_config()`, `set_log_level(level)`. Refusals are `Error` replies in words.
"""
from __future__ import annotations

import asyncio
import os
import platform
import time
from typing import Any, Awaitable, Callable

from loraxd import __version__
from loraxd.config.changes import Change, pending_restart, plan_reload, settings
from loraxd.config.tree import ConfigError, reloadable
from loraxd.engine.adapters import LOADED, AdapterEntry, adapter_key
from loraxd.engine.request import AdapterRef
from loraxd.protocol.control import (AdapterInfo, AdapterList, AdapterState, AdapterUnloaded,
                                     CancelRequest, CheckConfig, CheckHealth, ConfigChecked,
                                     ConfigShown, Drain, DrainState, Error, GetStatus,
                                     GetVersion, Health, ListAdapters, ListRequests,
                                     ListWorkers, LoadAdapter, LogLevel, Reload, Reloaded,
                                     Reply, RequestCancelled, RequestInfo, RequestList, Resume,
                                     SetLogLevel, Setting, SettingChange, ShowConfig, Status,
                                     UnloadAdapter, UnpinAdapter, Version, WorkerInfo,
                                     WorkerList)

_SOURCES = ("hub", "local", "s3")
_POLL_S = 0.05  # how often a waiting load looks at its adapter again


class Commands:
    def __init__(self, service: Any):
        self.service = service
        self._handlers: dict[type, Callable[[Any], Awaitable[Reply]]] = {
            GetStatus: self._status, CheckHealth: self._health, GetVersion: self._version,
            ListWorkers: self._workers, ListAdapters: self._adapters,
            LoadAdapter: self._load, UnloadAdapter: self._unload, UnpinAdapter: self._unpin,
            ListRequests: self._requests, CancelRequest: self._cancel, Drain: self._drain,
            Resume: self._resume, Reload: self._reload, ShowConfig: self._show_config,
            CheckConfig: self._check_config, SetLogLevel: self._log_level}

    async def handle(self, request: Any) -> Reply:
        return await self._handlers[type(request)](request)

    @property
    def engine(self) -> Any:
        return self.service.engine

    # -- the daemon ---------------------------------------------------------------------------

    async def _status(self, _: GetStatus) -> Status:
        service, engine = self.service, self.engine
        stats, info = engine.stats(), engine.info()
        manager = engine.adapters
        return Status(
            version=__version__, pid=os.getpid(), state=service.state,
            serving=service.state == "serving",
            model_id=str(info.get("model_id", "")), dtype=str(info.get("model_dtype", "")),
            device=str(info.get("model_device_type", "")), url=service.url,
            uptime_s=round(service.uptime_s, 3), worker_pids=list(service.supervisor.pids),
            num_running=stats["num_running"], num_waiting=stats["num_waiting"],
            kv_cache_usage=float(stats["kv_cache_usage"]), num_steps=stats["num_steps"],
            num_adapters_loaded=sum(1 for e in manager.entries.values() if e.status == LOADED),
            num_adapter_slots=len(manager.slots), num_adapters_known=len(manager.entries),
            config_file=service.config_file, num_pending_restart=len(self._pending()))

    async def _health(self, _: CheckHealth) -> Health:
        state = self.service.state
        if state != "serving":
            return Health(False, state)
        healthy = bool(await self.engine.health())
        return Health(healthy, "serving" if healthy else "unhealthy")

    async def _version(self, _: GetVersion) -> Version:
        return Version(__version__, os.getpid(), platform.python_version())

    async def _workers(self, _: ListWorkers) -> WorkerList:
        return WorkerList([WorkerInfo(r.rank, r.pid, r.device, r.state, r.rss_bytes,
                                      r.uptime_s, r.restarts, r.weight_bytes, r.kv_cache_bytes,
                                      r.device_total_bytes, r.device_free_bytes,
                                      r.device_name, r.device_used_bytes,
                                      r.gpu_utilization, r.gpu_memory_utilization)
                           for r in self.service.supervisor.ranks()])

    # -- adapters -----------------------------------------------------------------------------

    async def _adapters(self, _: ListAdapters) -> AdapterList:
        return AdapterList([adapter_info(e) for e in self.engine.adapters.entries.values()])

    def _ref(self, adapter_id: str, source: str | None) -> AdapterRef:
        source = source or self.service.config.adapters.adapter_source
        if source not in _SOURCES:
            raise _Refused(f"adapter source {source!r} is not served; the sources are "
                           f"{', '.join(_SOURCES)}")
        return AdapterRef(adapter_id, source)

    async def _load(self, req: LoadAdapter) -> Reply:
        if getattr(self.engine, "sources", None) is None:
            return Error("this server serves no adapters")
        try:
            ref = self._ref(req.adapter_id, req.source)
        except _Refused as exc:
            return Error(str(exc))
        manager, key = self.engine.adapters, adapter_key(ref)
        manager.preload(ref, pin=req.pin)
        try:
            await manager.ensure_fetched(ref)
        except Exception as exc:  # noqa: BLE001 - the fetch error, in words, is the answer
            return Error(f"adapter {key}: {exc}")
        deadline = time.monotonic() + max(req.wait_s, 0.0)
        while True:
            entry = manager.entries.get(key)
            if entry is None:
                return Error(f"adapter {key}: it failed to load (the daemon's log says why)")
            if entry.status == LOADED or time.monotonic() >= deadline:
                return AdapterState(adapter_info(entry))
            await asyncio.sleep(_POLL_S)

    def _entry_key(self, adapter_id: str, source: str | None) -> str:
        key = adapter_key(self._ref(adapter_id, source))
        if key not in self.engine.adapters.entries:
            raise _Refused(f"adapter {key} is not known to the daemon")
        return key

    async def _unload(self, req: UnloadAdapter) -> Reply:
        try:
            key = self._entry_key(req.adapter_id, req.source)
            self.engine.adapters.unload(key)
        except _Refused as exc:
            return Error(str(exc))
        except ValueError as exc:
            return Error(f"adapter {key} cannot be unloaded now: {exc}")
        return AdapterUnloaded(key)

    async def _unpin(self, req: UnpinAdapter) -> Reply:
        try:
            key = self._entry_key(req.adapter_id, req.source)
        except _Refused as exc:
            return Error(str(exc))
        return AdapterState(adapter_info(self.engine.adapters.unpin(key)))

    # -- requests -----------------------------------------------------------------------------

    async def _requests(self, _: ListRequests) -> RequestList:
        scheduler, now = self.engine.scheduler, time.monotonic()
        rows = [request_info(seq, "running", now) for seq in scheduler.running.values()]
        rows += [request_info(seq, "waiting", now) for seq in scheduler.waiting]
        return RequestList(sorted(rows, key=lambda r: r.request_id))

    async def _cancel(self, req: CancelRequest) -> Reply:
        if not self.engine.cancel(req.request_id):
            return Error(f"there is no request {req.request_id}")
        return RequestCancelled(req.request_id)

    async def _drain(self, req: Drain) -> Reply:
        try:
            self.service.drain()
        except RuntimeError as exc:
            return Error(str(exc))
        left = await self.service.wait_drained(req.wait_s) if req.wait_s > 0 \
            else self.engine.num_requests
        return DrainState(self.service.state, left)

    async def _resume(self, _: Resume) -> Reply:
        try:
            self.service.resume()
        except RuntimeError as exc:
            return Error(str(exc))
        return DrainState(self.service.state, self.engine.num_requests)

    # -- configuration ------------------------------------------------------------------------

    async def _reload(self, _: Reload) -> Reply:
        try:
            plan = await self.service.reload()
        except ConfigError as exc:
            return Error(f"configuration not reloaded, the running one stays: {exc}")
        return Reloaded(self.service.config_file, _changes(plan.applied),
                        _changes(plan.pending))

    async def _check_config(self, _: CheckConfig) -> Reply:
        try:
            plan = plan_reload(self.service.config, self.service.read_config())
        except ConfigError as exc:
            return Error(f"configuration not valid: {exc}")
        return ConfigChecked(self.service.config_file, _changes(plan.applied),
                             _changes(plan.pending))

    def _pending(self) -> dict[str, Any]:
        try:
            return pending_restart(self.service.config, self.service.read_config())
        except ConfigError:
            return {}

    async def _show_config(self, _: ShowConfig) -> ConfigShown:
        running = self.service.config
        try:
            loaded, error = self.service.read_config(), None
        except ConfigError as exc:
            loaded, error = running, str(exc)
        rows = []
        for (section, name, value), (_, _, new) in zip(settings(running), settings(loaded)):
            live = reloadable(section, name)
            pending = "" if new == value else "reload" if live else "restart"
            rows.append(Setting(f"{section}.{name}", _plain(value), live, pending,
                                _plain(new) if pending else None))
        return ConfigShown(self.service.config_file, rows, error)

    async def _log_level(self, req: SetLogLevel) -> Reply:
        if req.level is not None:
            try:
                self.service.set_log_level(req.level)
            except ValueError as exc:
                return Error(str(exc))
        return LogLevel(self.service.log_level)


class _Refused(Exception):
    pass


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _changes(changes: tuple[Change, ...]) -> list[SettingChange]:
    return [SettingChange(c.key, _plain(c.old), _plain(c.new)) for c in changes]


def adapter_info(entry: AdapterEntry) -> AdapterInfo:
    return AdapterInfo(key=entry.key, status=entry.status, slot=entry.slot,
                       num_running=entry.num_running, num_waiting=entry.num_waiting,
                       pinned=entry.pinned, error=entry.error)


def request_info(seq: Any, state: str, now: float) -> RequestInfo:
    spec = seq.request.adapter_spec
    return RequestInfo(request_id=seq.req_id, state=state,
                       adapter="" if spec is None else adapter_key(spec),
                       prompt_tokens=len(seq.request.prompt_ids),
                       generated_tokens=len(seq.output_ids),
                       max_new_tokens=seq.request.max_new_tokens,
                       age_s=round(now - seq.arrival, 3))
