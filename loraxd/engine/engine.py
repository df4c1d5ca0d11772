"""AsyncEngine: the event-loop face of the scheduler and the workers.

One task owns the step loop: plan a step, send it to every rank, wait for rank 0's result,
apply it, hand each request its events. `generate()` is an async generator per request;
closing it early aborts the request, freeing its pages and batch slot at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from loraxd import __version__
from loraxd.engine.adapter_fetch import AdapterFetcher
from loraxd.engine.adapters import AdapterManager, adapter_key
from loraxd.engine.block_manager import BlockManager
from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.rank_replies import AdapterReplies
from loraxd.engine.request import (AdapterError, AdapterRef, EngineError, FinishEvent,
                                   GenerationRequest, MergedAdapters, TokenEvent, Unavailable)
from loraxd.engine.scheduler import Scheduler, SchedulerLimits, StepPlan
from loraxd.engine.sequence import Sequence
from loraxd.engine.tokenizer import Tokenizer
from loraxd.engine.worker_client import WorkerClient, WorkerLost
from loraxd.protocol.worker import (AdapterLoaded, AdapterMerge, LoadAdapter, Ready, StepFailed,
                                    StepResult)

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
        self.ready = ready
        self._recover = recover
        self.sources = sources  # loraxd.adapters.sources.AdapterSources, or None: base only
        self._ranks = ranks  # each rank's device and memory, for /info
        self._adapter_replies = AdapterReplies(config.model.num_shard)
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
            SchedulerLimits(sched.max_batch_prefill_tokens, sched.waiting_served_ratio,
                            sched.max_waiting_tokens),
            BlockManager(ready.num_blocks, ready.block_size),
            eos_ids=frozenset(ready.eos_token_ids),
            special_ids=tokenizer.special_ids,
            decode_one=lambda i: tokenizer.decode([i]),
            adapters=self.adapters)
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._serving = True
        self._draining = False  # loraxctl drain / a stop: new requests get 503
        self._quiet: set[int] = set()  # health probes: not logged
        self._step_started = 0.0
        self._last_step_done = 0.0
        self._task: asyncio.Task | None = None
        self._step_result: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._step_id = -1
        self._lost: WorkerLost | None = None
        self._handlers = {StepResult: self._on_step_result, StepFailed: self._on_step_result,
                          AdapterLoaded: self._on_adapter_loaded}
        self.num_steps = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="step-loop")
        for adapter_id in self.config.adapters.preloaded_adapter_ids:
            self.adapters.preload(AdapterRef(adapter_id, self.config.adapters.adapter_source))

    @property
    def serving(self) -> bool:
        """False while the workers restart."""
        return self._serving

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
        if self._task is None or self._task.done():
            return float("inf") if self._task is not None else 0.0
        if self._step_result is None:
            return 0.0
        return time.monotonic() - self._step_started

    def cancel(self, req_id: int) -> bool:
        """End a request now (loraxctl requests cancel); False when there is no such one."""
        queue = self._streams.get(req_id)
        if queue is None:
            return False
        if self.scheduler.abort(req_id):
            self._wake.set()
        queue.put_nowait(EngineError("Request failed during generation: cancelled by the "
                                     "operator"))
        return True

    def _wake_up(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._serving = False
        tasks = [t for t in (self._task, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.fetcher is not None:
            self.fetcher.close()
        self._fail(list(self._streams), Unavailable("the server is shutting down"))

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest, *,
                       quiet: bool = False) -> AsyncIterator[TokenEvent | FinishEvent]:
        if not self._serving:
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
        self._wake.set()
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
                self._wake.set()

    async def health(self) -> bool:
        if not self._serving or self._task is None or self._task.done():
            return False
        if time.monotonic() - self._last_step_done < _HEALTH_FRESH_S:
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
            "model_device_type": self.ready.device.partition(":")[0],  # "cuda", not "cuda:0"
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.scheduler.max_concurrent_requests,
            "max_best_of": c.scheduler.max_best_of,
            "max_stop_sequences": c.scheduler.max_stop_sequences,
            "max_input_length": c.scheduler.max_input_length,
            "max_total_tokens": c.scheduler.max_total_tokens,
            "waiting_served_ratio": c.scheduler.waiting_served_ratio,
            "max_batch_total_tokens": c.scheduler.max_batch_total_tokens,
            "max_waiting_tokens": c.scheduler.max_waiting_tokens,
            "validation_workers": 1,
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

    def stats(self) -> dict:
        """Scheduler state for /metrics and loraxctl."""
        s = self.scheduler
        return {"num_waiting": s.num_waiting, "num_running": len(s.running),
                "kv_cache_usage": s.blocks.usage, "num_steps": self.num_steps}

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
        except WorkerLost as exc:
            self.adapters.on_loaded(slot, entry.key, f"the workers are restarting ({exc})")

    def _on_adapter_loaded(self, msg: AdapterLoaded) -> None:
        joined = self._adapter_replies.add(msg)  # loaded once every rank holds its part
        if joined is not None:
            self.adapters.on_loaded(joined.slot, joined.adapter_key, joined.error)

    def _adapter_failed(self, key: str, error: str) -> None:
        doomed = [s for s in self.scheduler.waiting if s.request.adapter_spec is not None
                  and adapter_key(s.request.adapter_spec) == key]
        for seq in doomed:
            self.scheduler.remove_waiting(seq)
        self._fail([s.req_id for s in doomed],
                   AdapterError(f"Request failed during generation: adapter {key}: {error}"))

    # -- the step loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        self._reader = self._start_reader()
        while True:
            if self._lost is not None:
                self._reader = await self._on_worker_lost(self._lost)
                continue
            plan = self.scheduler.schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(plan)
            except WorkerLost as exc:
                self._lost = exc
            except Exception as exc:  # noqa: BLE001 - a bug fails its step's requests only
                log.exception("step %d could not be applied", plan.step.step_id)
                self._fail_step(plan, list(plan.seqs), f"{type(exc).__name__}: {exc}")

    async def _step(self, plan: StepPlan) -> None:
        self._step_result = asyncio.get_running_loop().create_future()
        self._step_id = plan.step.step_id
        self._step_started = time.monotonic()
        try:
            await self.workers.broadcast(plan.step)
            result = await self._step_result
        finally:
            self._step_result = None
        if isinstance(result, StepFailed):
            log.error("step %d failed: %s", result.step_id, result.message)
            self._fail_step(plan, result.req_ids or list(plan.seqs), result.message)
            return
        self.num_steps += 1
        self._last_step_done = time.monotonic()
        for req_id, event in self.scheduler.update(plan, result):
            queue = self._streams.get(req_id)
            if queue is not None:
                queue.put_nowait(event)

    def _fail_step(self, plan: StepPlan, req_ids: list[int], why: str) -> None:
        failed = self.scheduler.fail(req_ids)
        self._fail([s.req_id for s in failed],
                   EngineError(f"Request failed during generation: {why}"))

    def _start_reader(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._read(), name="worker-reader")

    async def _read(self) -> None:
        """The one reader of the worker socket: step results to the step loop, the rest to
        their handlers. A lost worker fails the pending step or wakes the loop."""
        while True:
            try:
                rank, msg = await self.workers.recv()
            except WorkerLost as exc:
                self._lost = exc
                if self._step_result is not None and not self._step_result.done():
                    self._step_result.set_exception(exc)
                self._wake.set()
                return
            handler = self._handlers.get(type(msg))
            if handler is None:
                log.warning("ignoring %s from rank %d", type(msg).__name__, rank)
            else:
                handler(msg)

    def _on_step_result(self, msg: StepResult | StepFailed) -> None:
        future = self._step_result
        if future is not None and not future.done() and msg.step_id == self._step_id:
            future.set_result(msg)

    async def _on_worker_lost(self, exc: WorkerLost) -> asyncio.Task:
        log.error("%s; failing running requests and restarting the workers", exc)
        self._serving = False
        failed = self.scheduler.fail_all_running()
        self._fail([s.req_id for s in failed], EngineError(
            f"Request failed during generation: the worker died ({exc})"))
        try:
            self.ready = await self._recover()
        except Exception as err:  # noqa: BLE001 - any failure to restart leaves us unavailable
            log.error("could not restart the workers: %s", err)
            waiting = list(self.scheduler.waiting)
            for seq in waiting:
                self.scheduler.remove_waiting(seq)
            self._fail([s.req_id for s in waiting], Unavailable(f"no healthy worker: {err}"))
            raise
        self.adapters.reset_slots()
        self._adapter_replies.reset()
        self._serving = True
        self._lost = None
        log.info("workers are back; serving")
        return self._start_reader()

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
