"""AsyncEngine: the event-loop face of the scheduler and the workers.

The step loop (loraxd.engine.step_loop) plans and runs the steps, and replaces the workers
when they die or hang; the engine hands each request its events. `generate()` is an async
generator per request; closing it early aborts the request, freeing its pages and batch
slot at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from loraxd import __version__
from loraxd.config.tree import CPU_KV_TOKENS
from loraxd.engine.adapter_fetch import AdapterFetcher
from loraxd.engine.adapters import AdapterManager, adapter_key
from loraxd.engine.block_manager import BlockManager
from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.rank_replies import AdapterReplies
from loraxd.engine.request import (AdapterError, AdapterRef, EngineError, FinishEvent,
                                   GenerationRequest, MergedAdapters, TokenEvent, Unavailable)
from loraxd.engine.scheduler import Scheduler, SchedulerLimits
from loraxd.engine.sequence import Sequence
from loraxd.engine.step_loop import StepLoop
from loraxd.engine.tokenizer import Tokenizer
from loraxd.engine.worker_client import WorkerClient, WorkerLost
from loraxd.protocol.worker import (AdapterLoaded, AdapterMerge, LoadAdapter, Ready,
                                    SetLogLevel)

log = logging.getLogger(__name__)

# How recently a step must have completed for /health to answer without a probe.
_HEALTH_FRESH_S = 2.0
_HEALTH_PROBE_TIMEOUT_S = 30.0


class AsyncEngine:
    def __init__(self, config, tokenizer: Tokenizer, workers: WorkerClient, ready: Ready,
                 recover: Callable[[], Awaitable[Ready]], sources=None,
                 ranks: Callable[[], list[dict]] | None = None):
        self.config = config
        self.model_id = config.model.model_id
        self.tokenizer = tokenizer
        self.workers = workers
        self._ready = ready
        self.sources = sources  # loraxd.adapters.sources.AdapterSources, or None: base only
        self._ranks = ranks  # each rank's device and memory, for /info
        self._adapter_replies = AdapterReplies(config.model.num_shard)
        self.host_cached: frozenset[str] = frozenset()  # the workers' host LRU, for /metrics
        self.adapters = AdapterManager(
            num_slots=config.adapters.max_active_adapters,
            cycle_time_s=config.adapters.adapter_cycle_time_s,
            fetch=self._fetch_adapter, load=self._load_adapter,
            on_failed=self._adapter_failed, wake=self._wake_up)
        self.fetcher = None if sources is None else AdapterFetcher(
            sources, max_downloads=config.adapters.max_adapter_downloads,
            timeout_s=config.adapters.adapter_fetch_timeout_s,
            busy=self.adapters.busy_refs, forget=self.adapters.forget_idle)
        sched = config.scheduler
        self.scheduler = Scheduler(
            SchedulerLimits.from_config(sched),
            BlockManager(ready.num_blocks, ready.block_size, sched.prefix_caching),
            eos_ids=frozenset(ready.eos_token_ids),
            special_ids=tokenizer.special_ids,
            decode_one=lambda i: tokenizer.decode([i]),
            adapters=self.adapters)
        self.steps = StepLoop(scheduler=self.scheduler, workers=workers,
                              settings=lambda: self.config.worker, recover=recover,
                              deliver=self._deliver, fail=self._fail,
                              adapter_loaded=self._on_adapter_loaded,
                              replaced=self._on_workers_replaced)
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._draining = False  # loraxctl drain / a stop: new requests get 503
        self._stopped = False
        self._quiet: set[int] = set()  # health probes: not logged
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="step-loop")
        for adapter_id in self.config.adapters.preloaded_adapter_ids:
            self.adapters.preload(AdapterRef(adapter_id, self.config.adapters.adapter_source))

    async def _run(self) -> None:
        await self.steps.run()

    @property
    def serving(self) -> bool:
        """False while the workers are replaced, and for good once they cannot be."""
        return self.steps.serving and not self._stopped and not self.ended

    @property
    def ended(self) -> bool:
        """The step loop is over: the workers could not be brought back (see `failure`)."""
        return self._task is not None and self._task.done()

    def when_ended(self, callback) -> None:
        """Call `callback(error)` if the step loop ends for any reason but `stop()`."""
        def done(task: asyncio.Task) -> None:
            if not self._stopped:
                callback(self.failure())
        self._task.add_done_callback(done)

    def failure(self) -> BaseException | None:
        """Why the step loop ended, once it has."""
        if not self.ended or self._task.cancelled():
            return None
        return self._task.exception()

    @property
    def ready(self) -> Ready:
        """The running workers' Ready (the replacements' once the workers were replaced)."""
        return self.steps.ready or self._ready

    @property
    def num_steps(self) -> int:
        return self.steps.num_steps

    @property
    def draining(self) -> bool:
        """True from `drain()` to `resume()`: running requests go on, new ones get 503."""
        return self._draining

    def drain(self) -> None:
        self._draining = True

    def resume(self) -> None:
        self._draining = False

    @property
    def num_requests(self) -> int:
        """Requests the engine holds (running, waiting, or their last event unread)."""
        return len(self._streams)

    def stalled_for(self) -> float:
        """The heartbeat: seconds the step in flight has waited for the workers (0 between
        steps and while idle); infinite once the step loop has ended."""
        if self._task is None:
            return 0.0
        if self._task.done():
            return float("inf")
        started = self.steps.step_started
        return 0.0 if started is None else time.monotonic() - started

    def cancel(self, req_id: int) -> bool:
        """End a request now (loraxctl requests cancel); False when there is no such one."""
        queue = self._streams.get(req_id)
        if queue is None:
            return False
        if self.scheduler.abort(req_id):
            self.steps.wake()
        queue.put_nowait(EngineError("Request failed during generation: cancelled by the "
                                     "operator"))
        return True

    def set_worker_log_level(self, level: str) -> None:
        """Every rank logs at `level` from the next step on. A restarted rank needs no
        message: it starts at the supervisor's level, set first (loraxd.logs.set_level)."""
        self.steps.send_between_steps(SetLogLevel(level))

    def _wake_up(self) -> None:
        self.steps.wake()

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.fetcher is not None:
            self.fetcher.close()
        self._fail(list(self._streams), Unavailable("the server is shutting down"))

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest, *,
                       quiet: bool = False) -> AsyncIterator[TokenEvent | FinishEvent]:
        if self._stopped or self.ended:  # while the workers restart, requests queue
            raise Unavailable("no healthy worker")
        if self._draining:
            raise Unavailable("the server is draining: it takes no new requests")
        arrival = time.monotonic()  # queue time includes fetching the adapter
        if req.adapter_spec is not None:
            await self._authorize(req.adapter_spec)
        req_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, self.tokenizer.special_ids)
        self._streams[req_id] = queue
        if quiet:
            self._quiet.add(req_id)
        self.scheduler.add(Sequence(req_id, req, detok, arrival=arrival))
        self.steps.wake()
        finished = False
        try:
            while True:
                event = await queue.get()
                if req_id not in self._quiet:
                    _log_event(req_id, event)
                if isinstance(event, Exception):
                    finished = True
                    raise event
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            self._streams.pop(req_id, None)
            self._quiet.discard(req_id)
            if not finished and self.scheduler.abort(req_id):
                log.info("request %d abandoned by its client", req_id,
                         extra={"request_id": req_id})
                self.steps.wake()

    async def health(self) -> bool:
        if not self.serving or self._task is None:
            return False
        if time.monotonic() - self.steps.last_step_done < _HEALTH_FRESH_S:
            return True
        probe = GenerationRequest(prompt_ids=self.tokenizer.encode_now("ping") or [0],
                                  max_new_tokens=1, ignore_eos=True)
        try:
            async with asyncio.timeout(_HEALTH_PROBE_TIMEOUT_S):
                async for event in self.generate(probe, quiet=True):
                    if isinstance(event, FinishEvent):
                        return True
        except (EngineError, TimeoutError):
            return False
        return False

    def info(self) -> dict:
        c = self.config
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": self.ready.dtype,
            "quantize": self.ready.quantize,  # as LoRAX's launcher names it; None: none
            "model_device_type": self.ready.device.partition(":")[0],  # "cuda", not "cuda:0"
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.scheduler.max_concurrent_requests,
            "max_best_of": c.scheduler.max_best_of,
            "max_stop_sequences": c.scheduler.max_stop_sequences,
            "max_input_length": c.scheduler.max_input_length,
            "max_total_tokens": c.scheduler.max_total_tokens,
            "waiting_served_ratio": c.scheduler.waiting_served_ratio,
            "max_batch_total_tokens": self.kv_tokens(),
            "max_waiting_tokens": c.scheduler.max_waiting_tokens,
            "validation_workers": c.server.validation_workers,
            "eos_token": self.ready.eos_token_ids[0] if self.ready.eos_token_ids else None,
            "max_active_adapters": c.adapters.max_active_adapters,
            "adapter_source": c.adapters.adapter_source,
            "sharded": c.model.num_shard > 1,
            "num_shard": c.model.num_shard,
            "architecture": self.ready.architecture,
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "request_logger_url": None,
            "ranks": self._ranks() if self._ranks is not None else [],
        }

    def kv_tokens(self) -> int:
        """max_batch_total_tokens as the workers hold it: the setting, else what they sized
        (CPU_KV_TOKENS on a CPU, the pages that fit on CUDA)."""
        tokens = self.config.scheduler.max_batch_total_tokens
        if tokens is not None:
            return tokens
        if self.ready.device == "cpu":
            return CPU_KV_TOKENS
        return self.ready.num_blocks * self.ready.block_size

    def stats(self) -> dict:
        """Scheduler state for /metrics and loraxctl."""
        s = self.scheduler
        return {"num_waiting": s.num_waiting, "num_running": len(s.running),
                "kv_cache_usage": s.blocks.usage, "num_steps": self.num_steps,
                "batch_max_tokens": sum(seq.max_len for seq in s.running.values()),
                "num_kv_pages_used": s.blocks.num_used,
                "num_kv_pages_cached": s.blocks.num_cached,
                "num_preempted": s.num_preempted,
                "prefix_queried_tokens": s.prefix_queried_tokens,
                "prefix_hit_tokens": s.prefix_hit_tokens,
                "num_requests_held": self.num_requests}

    # -- adapters ----------------------------------------------------------------------------

    async def _authorize(self, spec: AdapterRef | MergedAdapters) -> None:
        """Fetch first (the fetch learns whether an adapter is private), then check this
        request's token: every request, not only the one that triggered the download."""
        if self.sources is None:
            raise AdapterError("Request failed during generation: this server serves no "
                               "adapters")
        refs = spec.components if isinstance(spec, MergedAdapters) else (spec,)
        try:
            await self.adapters.ensure_fetched(spec)
            for ref in refs:
                await self.fetcher.authorize(ref)
        except Exception as exc:  # noqa: BLE001 - every fetch/authorize failure is a 424
            raise AdapterError(f"Request failed during generation: {exc}") from exc

    async def adapter_dir(self, ref: AdapterRef) -> Path:
        """The adapter's files on disk, fetched and authorised for this request's token
        (its chat template is read from there)."""
        await self._authorize(ref)
        entry = self.adapters.entries.get(adapter_key(ref))
        if entry is None or entry.path is None:
            raise AdapterError(f"Request failed during generation: adapter {ref.adapter_id} "
                               "left the disk cache")
        return Path(entry.path)

    async def _fetch_adapter(self, spec: AdapterRef | MergedAdapters):
        if isinstance(spec, MergedAdapters):
            return list(await asyncio.gather(*(self._fetch_adapter(r)
                                               for r in spec.components)))
        return await self.fetcher.fetch(spec)

    async def _load_adapter(self, slot: int, entry) -> None:
        spec = entry.ref
        if isinstance(spec, MergedAdapters):
            msg = LoadAdapter(slot, entry.key, merge=AdapterMerge(
                [str(p) for p in entry.path], list(spec.weights), spec.merge_strategy,
                spec.density, spec.majority_sign_method), roots=self.sources.roots(spec.source))
        else:
            msg = LoadAdapter(slot, entry.key, str(entry.path),
                              roots=self.sources.roots(spec.source))
        try:
            await self.workers.broadcast(msg)
        except WorkerLost:  # the workers are being replaced: it loads into the new ones
            self.adapters.unsent(slot, entry.key)

    def _on_adapter_loaded(self, msg: AdapterLoaded) -> None:
        joined = self._adapter_replies.add(msg)  # loaded once every rank holds its part
        if joined is not None:
            self.host_cached = frozenset(joined.host_cached)
            self.adapters.on_loaded(joined.slot, joined.adapter_key, joined.error)

    def _on_workers_replaced(self) -> None:
        """New workers, with empty slots: every adapter loads again (or is quarantined)."""
        self._adapter_replies.reset()
        self.host_cached = frozenset()
        self.adapters.reset_slots(self.scheduler.waiting)

    def _adapter_failed(self, key: str, error: str) -> None:
        doomed = [s for s in self.scheduler.waiting if s.request.adapter_spec is not None
                  and adapter_key(s.request.adapter_spec) == key]
        for seq in doomed:
            self.scheduler.remove_waiting(seq)
        self._fail([s.req_id for s in doomed],
                   AdapterError(f"Request failed during generation: adapter {key}: {error}"))

    # -- events ------------------------------------------------------------------------------

    def _deliver(self, req_id: int, event) -> None:
        queue = self._streams.get(req_id)
        if queue is not None:
            queue.put_nowait(event)

    def _fail(self, req_ids: list[int], error: Exception) -> None:
        for req_id in req_ids:
            queue = self._streams.get(req_id)
            if queue is not None:
                queue.put_nowait(error)


def _log_event(req_id: int, event) -> None:
    """One line per request outcome, with its id (also a field of JSON log lines)."""
    extra = {"request_id": req_id}
    if isinstance(event, FinishEvent):
        log.info("request %d finished (%s): %d prompt + %d generated tokens, queued %.3f s, "
                 "generated in %.3f s", req_id, event.finish_reason, event.prompt_tokens,
                 event.generated_tokens, event.queue_time_s, event.inference_time_s,
                 extra=extra)
    elif isinstance(event, Exception):
        log.warning("request %d failed: %s", req_id, event, extra=extra)
