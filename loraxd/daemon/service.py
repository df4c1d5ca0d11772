"""The daemon's life as a service: start, serve, reload, drain, stop.

Start: the workers load the model and answer, a one-token probe generates, the control
socket and the HTTP port are bound; only then READY=1. STATUS= tells the progress, then a
one-line summary kept current. Reload (SIGHUP, `loraxctl reload`, `systemctl reload`):
RELOADING=1, the whole configuration read and validated again, the reloadable settings put
in force at once, READY=1; a file that does not validate changes nothing. Drain: new
generation requests get 503, running ones go on. Stop (SIGTERM, SIGINT): STOPPING=1, a
drain of at most `drain_timeout_s` (a second signal cuts it short), then the parts close in
order and the process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Callable

from aiohttp import web

from loraxd.adapters.sources import adapter_sources
from loraxd.config import Config, ConfigError
from loraxd.config.changes import ReloadPlan, plan_reload
from loraxd.control.commands import Commands
from loraxd.control.server import ControlServer
from loraxd.daemon import notify
from loraxd.daemon.devices import kv_limits_error
from loraxd.daemon.reload import apply
from loraxd.daemon.supervisor import Supervisor, WorkerStartError
from loraxd.daemon.watchdog import Watchdog
from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import AdapterRef
from loraxd.engine.tokenizer import Tokenizer
from loraxd.engine.worker_client import WorkerClient
from loraxd.http.api_keys import KeyRing, KeysFileError
from loraxd.http.app import FRONTEND_KEY, make_app, make_runner
from loraxd.http.app import reload as reload_http
from loraxd.logs import current_level, set_level

log = logging.getLogger("loraxd")

_STATUS_EVERY_S = 5.0  # how often STATUS= is brought up to date (when it changed)
_DRAIN_POLL_S = 0.1
_HTTP_SHUTDOWN_S = 5.0  # after the drain: how long the HTTP server waits for its handlers


class Service:
    def __init__(self, config: Config, model_dir: Path, *, config_file: str | None,
                 read_config: Callable[[], Config]):
        self.config = config  # the tree in force; a reload swaps it whole
        self.config_file = config_file
        self.read_config = read_config  # the configuration as its sources say now
        self.model_dir = model_dir
        self.url = f"http://{config.server.hostname}:{config.server.port}"
        self.engine: AsyncEngine | None = None
        self.supervisor: Supervisor | None = None
        self.frontend = None
        self.app: web.Application | None = None
        self._state = "starting"
        self._started_at = time.monotonic()
        self._stop: asyncio.Event | None = None
        self._stop_now: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []
        self._fatal: WorkerStartError | None = None  # why the daemon must exit non-zero

    # -- what the control commands read and do ----------------------------------------------

    @property
    def state(self) -> str:
        """starting | serving | draining | restarting | stopping"""
        if self._state in ("serving", "draining") and not self.engine.serving:
            return "restarting"
        return self._state

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def log_level(self) -> str:
        return current_level()

    def set_log_level(self, level: str) -> None:
        """The supervisor's level now, every worker's before its next step."""
        set_level(level)  # ValueError for an unknown level
        self.engine.set_worker_log_level(level)
        log.info("log level set to %s", level)

    def drain(self) -> None:
        if self._state in ("starting", "stopping"):
            raise RuntimeError(f"the daemon is {self._state}")
        if self._state != "draining":
            self.engine.drain()
            self._state = "draining"
            log.info("draining: new generation requests get 503; %d running",
                     self.in_flight())
            notify.status(self.summary())

    def resume(self) -> None:
        if self._state in ("starting", "stopping"):
            raise RuntimeError(f"the daemon is {self._state}; it cannot resume")
        if self._state == "draining":
            self.engine.resume()
            self._state = "serving"
            log.info("resumed: taking new requests")
            notify.status(self.summary())

    def in_flight(self) -> int:
        """Generation requests not yet answered in full: the engine's, and the HTTP ones
        still fetching an adapter or writing their last event."""
        limiter = self.frontend.limiter if self.frontend is not None else None
        return max(self.engine.num_requests, limiter.num_inflight if limiter else 0)

    async def wait_drained(self, timeout_s: float) -> int:
        """Wait until nothing is in flight, at most `timeout_s`; what is left."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            if self._stop_now is not None and self._stop_now.is_set():
                break
            await asyncio.sleep(_DRAIN_POLL_S)
        return self.in_flight()

    async def reload(self) -> ReloadPlan:
        """Read and validate everything, then apply the reloadable settings; ConfigError
        (nothing changed) when the configuration is not valid."""
        async with self._reload_lock:
            notify.reloading()
            try:
                plan = plan_reload(self.config, self.read_config())
                error = kv_limits_error(plan.config.scheduler, self.supervisor.kv_bounds)
                if error is not None:
                    raise ConfigError(f"[scheduler] {error}")
                _check_api_keys(plan.config)
                apply(plan.config, old=self.config, engine=self.engine, frontend=self.frontend,
                      supervisor=self.supervisor)
                self.config = plan.config
                reload_http(self.app)  # the API keys file, read again
            except ConfigError as exc:
                log.error("configuration not reloaded, the running one stays: %s", exc)
                raise
            finally:
                notify.ready(self.summary())
        log.info("configuration reloaded from %s: %s", self.config_file or "defaults",
                 ", ".join(f"{c.key} = {c.new!r}" for c in plan.applied) or "nothing changed")
        for change in plan.pending:
            log.warning("%s = %r waits for a restart (running with %r)", change.key,
                        change.new, change.old)
        return plan

    def summary(self) -> str:
        """The one-line STATUS= of a running daemon."""
        engine = self.engine
        stats = engine.stats()
        loaded = sum(1 for e in engine.adapters.entries.values() if e.status == "loaded")
        head = {"serving": f"serving {self.config.model.model_id} on {self.url}",
                "draining": "draining: new requests get 503",
                "restarting": "restarting the workers",
                "stopping": "stopping: draining"}.get(self.state, self.state)
        return (f"{head}; {stats['num_running']} running, {stats['num_waiting']} waiting, "
                f"KV cache {100 * stats['kv_cache_usage']:.0f}% used, {loaded} adapter(s) "
                "loaded")

    # -- life --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT. Raises WorkerStartError, KeysFileError or OSError
        when the start fails, and WorkerStartError when the workers die more often than the
        restart budget allows."""
        loop = asyncio.get_running_loop()
        self._stop, self._stop_now = asyncio.Event(), asyncio.Event()
        self._reload_lock = asyncio.Lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        runtime = Path(self.config.paths.runtime_dir)
        runtime.mkdir(mode=0o750, parents=True, exist_ok=True)
        Path(self.config.paths.shard_uds_path).parent.mkdir(mode=0o750, parents=True,
                                                            exist_ok=True)
        workers = WorkerClient(f"ipc://{self.config.paths.shard_uds_path}",
                               self.config.model.num_shard)
        self.supervisor = Supervisor(self.config, str(self.model_dir), workers)
        tokenizer = Tokenizer(self.model_dir, num_threads=self.config.server.validation_workers)
        parts: dict = {}
        try:
            if await self._start_unless_stopped(parts, workers, tokenizer):
                self._serving()
                await self._stop.wait()
                if self._fatal is None:
                    await self._drain_for_stop()
        finally:
            await self._close(parts)
            workers.close()
            tokenizer.close()
        if self._fatal is not None:
            raise self._fatal

    async def _start_unless_stopped(self, parts: dict, workers, tokenizer) -> bool:
        start = asyncio.ensure_future(self._start(parts, workers, tokenizer))
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not start.done():
            log.info("stopped while starting")
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return False
        start.result()  # raises what made the start fail
        return True

    async def _start(self, parts: dict, workers, tokenizer) -> None:
        config = self.config
        notify.status(f"starting {config.model.num_shard} worker(s): loading "
                      f"{config.model.model_id}")
        ready = await self.supervisor.start()
        self.engine = AsyncEngine(config, tokenizer, workers, ready,
                                  recover=self.supervisor.replace,
                                  sources=adapter_sources(config),
                                  ranks=self.supervisor.rank_summaries)
        tracer = None
        if config.server.otlp_endpoint is not None:
            from loraxd.http.tracing_export import TraceExport
            parts["tracing"] = TraceExport(config.server.otlp_endpoint)
            tracer = parts["tracing"].tracer
        # The app first: its metrics observe the engine from its first step and adapter move.
        self.app = make_app(self.engine, config, tracer=tracer, gpus=self.supervisor.gpus)
        self.frontend = self.app[FRONTEND_KEY]
        self.engine.start()
        if config.adapters.adapter_id is not None:  # the default adapter: pinned like a preload
            self.engine.adapters.preload(AdapterRef(config.adapters.adapter_id,
                                                    config.adapters.adapter_source))
        self.engine.when_ended(self._on_engine_ended)
        parts["engine"] = self.engine
        notify.status("the workers answered; checking that they generate")
        if not await self.engine.health():
            raise WorkerStartError("the workers loaded the model but a one-token probe did "
                                   "not generate")
        runner = make_runner(self.app, access_log=None, shutdown_timeout=_HTTP_SHUTDOWN_S)
        await runner.setup()
        parts["runner"] = runner
        control = ControlServer(config.paths.control_socket, Commands(self))
        parts["control"] = control
        await control.start()
        site = web.TCPSite(runner, config.server.hostname, config.server.port)
        await site.start()

    def _serving(self) -> None:
        self._state = "serving"
        config = self.config
        log.info("serving %s on %s (%s on %s); control socket %s", config.model.model_id,
                 self.url, self.engine.ready.dtype, self.engine.ready.device,
                 config.paths.control_socket)
        notify.ready(self.summary())
        self._tasks.append(asyncio.ensure_future(self._keep_status()))
        interval = notify.watchdog_interval_s()
        if interval is not None:
            self._tasks.append(asyncio.ensure_future(Watchdog(self.engine, interval).run()))

    async def _keep_status(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(_STATUS_EVERY_S)
            line = self.summary()
            if line != last:
                notify.status(line)
                last = line

    def _on_engine_ended(self, error: BaseException | None) -> None:
        """The workers cannot be brought back: stop, and exit non-zero."""
        if isinstance(error, WorkerStartError):
            self._fatal = error
        else:
            self._fatal = WorkerStartError(f"the step loop ended: {error!r}")
        log.error("stopping: %s", self._fatal)
        self._state = "stopping"
        notify.stopping(f"stopping: {self._fatal}")
        self._stop.set()

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("%s again: stopping without waiting for the drain",
                        signal.Signals(sig).name)
            self._stop_now.set()
        else:
            self._stop.set()

    def _on_sighup(self) -> None:
        if self._state not in ("serving", "draining"):
            log.warning("SIGHUP while %s: no reload", self._state)
            return

        async def reload() -> None:
            try:
                await self.reload()
            except ConfigError:
                pass  # logged; the running configuration stays
        self._tasks.append(asyncio.ensure_future(reload()))

    async def _drain_for_stop(self) -> None:
        self._state = "stopping"
        self.engine.drain()
        timeout = self.config.server.drain_timeout_s
        count = self.in_flight()
        log.info("stopping: draining %d request(s) for at most %g s", count, timeout)
        notify.stopping(f"stopping: draining {count} request(s)")
        left = await self.wait_drained(timeout)
        if left:
            log.warning("stopping with %d request(s) unfinished", left)
        else:
            log.info("drained; stopping")

    async def _close(self, parts: dict) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if "control" in parts:
            await parts["control"].stop()
        if "engine" in parts:
            await parts["engine"].stop()  # what the drain left fails: the handlers end
        if "runner" in parts:
            await parts["runner"].cleanup()
        if "tracing" in parts:  # after the handlers: their last spans go too
            await parts["tracing"].close()
        await self.supervisor.stop()


def _check_api_keys(config: Config) -> None:
    """A reload is refused whole when the API keys file in force does not read."""
    try:
        KeyRing(config.server.api_keys_file).load()
    except KeysFileError as exc:
        raise ConfigError(str(exc)) from None
