"""The step loop: plan a step, run it on the workers, apply its result; and notice when the
workers are dead or hung, replace them, and resume what they were running.

One task owns everything about the step in flight. A pump task only moves what the worker
socket delivers into the loop's inbox (with a lost worker as an exception in it); wake-ups
from new requests and loaded adapters arrive in the same inbox, so the loop waits on one
queue, with a deadline:
- a step must be answered within `StepDeadline.timeout(step)`;
- an idle worker is pinged every `heartbeat_interval_s` and must answer within
  `heartbeat_timeout_s`.
A worker that misses either is lost like one that exited: the supervisor kills and replaces
every rank (`recover`), the running sequences go back to the head of the queue with the
tokens they generated, and the new workers prefill prompt + generated tokens and carry on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from loraxd.engine.request import EngineError, Unavailable
from loraxd.engine.scheduler import Scheduler, StepPlan
from loraxd.engine.worker_client import WorkerLost
from loraxd.protocol.worker import (AdapterLoaded, FrameRejected, Ping, Pong, Ready, Step,
                                    StepFailed, StepResult)

log = logging.getLogger(__name__)

_WAKE = object()  # an inbox item: the scheduler may have work
_INITIAL_S_PER_TOKEN = 0.01  # until a step is measured; a slow CPU's order of magnitude
_DECAY = 0.9  # the per-token estimate forgets a slow step by this much per step


class WorkerHung(WorkerLost):
    """A worker that is alive but does not answer in time: stopped, deadlocked, starved."""


class StepDeadline:
    """How long a step may take: a floor, plus a factor times its predicted time.

    The prediction is seconds per token (prefilled or decoded) times the step's tokens. The
    estimate follows the slowest recent step (a decaying maximum of the forward times the
    workers report), so a slow stretch raises the deadline at once and a fast one lowers it
    slowly."""

    def __init__(self) -> None:
        self.s_per_token = _INITIAL_S_PER_TOKEN

    def timeout(self, step: Step, floor_s: float, factor: float) -> float:
        return floor_s + factor * self.s_per_token * _num_tokens(step)

    def observe(self, step: Step, forward_s: float) -> None:
        tokens = _num_tokens(step)
        if tokens:
            self.s_per_token = max(forward_s / tokens, self.s_per_token * _DECAY)


def _num_tokens(step: Step) -> int:
    return sum(len(s.prompt_ids) for s in step.new_seqs) + len(step.decode_ids)


class StepLoop:
    def __init__(self, *, scheduler: Scheduler, workers: Any,
                 settings: Callable[[], Any], recover: Callable[[], Awaitable[Ready]] | None,
                 deliver: Callable[[int, Any], None],
                 fail: Callable[[list[int], Exception], None],
                 adapter_loaded: Callable[[AdapterLoaded], None],
                 replaced: Callable[[], None]):
        """`deliver` and `fail` hand a request its event or its error; `adapter_loaded`
        takes each rank's answer to a LoadAdapter; `replaced` runs once new workers are up,
        before any step goes to them."""
        self.scheduler = scheduler
        self.workers = workers
        self.settings = settings  # the worker section of the configuration in force
        self._adapter_loaded = adapter_loaded
        self._replaced = replaced
        self._recover = recover
        self._deliver = deliver
        self._fail = fail
        self.deadline = StepDeadline()
        self.serving = True  # False while the workers are replaced
        self.num_steps = 0
        self.last_step_done = 0.0
        self.step_started: float | None = None  # the step in flight, if any
        self.ready: Ready | None = None  # the replacement workers' Ready, after a recovery
        # Called with (plan, result, seconds) after each step; result None: the workers were
        # lost during it.
        self.step_observers: list[Callable[[StepPlan, Any, float], None]] = []
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._outbox: dict[type, Any] = {}  # control messages for every rank, between steps
        self._woken = False
        self._pump: asyncio.Task | None = None
        self._pings: dict[int, float] = {}  # Ping seq -> when it went out, until all answer
        self._answered: dict[int, int] = {}  # rank -> highest Ping seq it answered
        self._next_ping = 0
        self._last_ping = 0.0
        self._lost_at: float | None = None

    def send_between_steps(self, msg: Any) -> None:
        """Broadcast `msg` before the next step (or now, if idle); of several of one kind
        only the last is sent."""
        self._outbox[type(msg)] = msg
        self.wake()

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            self._inbox.put_nowait(_WAKE)

    async def run(self) -> None:
        """Serve steps forever; raises when the workers cannot be brought back."""
        try:
            while True:
                self._pump = asyncio.get_running_loop().create_task(self._pump_worker(),
                                                                    name="worker-pump")
                try:
                    await self._serve()
                except WorkerLost as exc:
                    await self._stop_pump()
                    await self._replace(exc)
        finally:
            await self._stop_pump()

    # -- serving -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            while self._outbox:
                _, msg = self._outbox.popitem()
                await self.workers.broadcast(msg)
            plan = self.scheduler.schedule()
            if plan is None:
                await self._idle()
                continue
            try:
                await self._step(plan)
            except WorkerLost:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug fails its step's requests only
                log.exception("step %d could not be applied", plan.step.step_id)
                self._fail_step(plan, list(plan.seqs), f"{type(exc).__name__}: {exc}")

    async def _step(self, plan: StepPlan) -> None:
        s = self.settings()
        step = plan.step
        timeout = self.deadline.timeout(step, s.step_timeout_floor_s, s.step_timeout_factor)
        started = self.step_started = time.monotonic()
        result = None
        try:
            await self.workers.broadcast(step)
            result = await self._result_of(step.step_id, timeout)
        finally:
            self.step_started = None
            for observe in self.step_observers:
                observe(plan, result, time.monotonic() - started)
        self._heard_from_all()  # every rank took part in the step
        if isinstance(result, StepFailed):
            log.error("step %d failed: %s", result.step_id, result.message)
            self._fail_step(plan, result.req_ids or list(plan.seqs), result.message)
            return
        self.deadline.observe(step, result.forward_s)
        self.num_steps += 1
        self.last_step_done = time.monotonic()
        if self._lost_at is not None:
            log.info("first step on the new workers done %.2f s after the old ones were lost",
                     self.last_step_done - self._lost_at)
            self._lost_at = None
        for req_id, event in self.scheduler.update(plan, result):
            self._deliver(req_id, event)

    async def _result_of(self, step_id: int, timeout: float) -> StepResult | StepFailed:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerHung(f"step {step_id} got no answer from the workers within "
                                 f"{timeout:.1f} s")
            msg = await self._next(left)
            if isinstance(msg, (StepResult, StepFailed)) and msg.step_id == step_id:
                return msg
            if isinstance(msg, FrameRejected):  # most likely this step's own frame
                return StepFailed(step_id, [], f"worker rank {msg.rank} could not decode "
                                               f"the step: {msg.message}")
            self._dispatch(msg)

    async def _idle(self) -> None:
        """Wait for work; ping the workers meanwhile and give up on them if they don't
        answer."""
        s = self.settings()
        now = time.monotonic()
        if self._pings and now - min(self._pings.values()) > s.heartbeat_timeout_s:
            raise WorkerHung(f"the workers left a ping unanswered for "
                             f"{now - min(self._pings.values()):.1f} s")
        if now - self._last_ping >= s.heartbeat_interval_s:
            self._next_ping += 1
            self._pings[self._next_ping] = self._last_ping = now
            await self.workers.broadcast(Ping(self._next_ping))
        msg = await self._next(max(0.0, self._last_ping + s.heartbeat_interval_s - now))
        if msg is not None and msg is not _WAKE:
            self._dispatch(msg)

    async def _next(self, timeout: float) -> Any:
        """The next inbox item, or None after `timeout` s; raises a lost worker."""
        try:  # not wait_for: on Python 3.11 it can swallow a cancellation
            async with asyncio.timeout(timeout):
                item = await self._inbox.get()
        except TimeoutError:
            return None
        if item is _WAKE:
            self._woken = False
        elif isinstance(item, WorkerLost):
            raise item
        return item

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, AdapterLoaded):
            self._adapter_loaded(msg)
        elif isinstance(msg, Pong):
            self._answered[msg.rank] = max(msg.seq, self._answered.get(msg.rank, 0))
            done = min(self._answered.get(r, 0) for r in range(self.workers.world_size))
            for seq in [q for q in self._pings if q <= done]:
                del self._pings[seq]
        elif isinstance(msg, FrameRejected):
            log.error("worker rank %d could not decode a message: %s", msg.rank, msg.message)
        elif msg is not None and msg is not _WAKE:
            log.warning("ignoring %s from the workers", type(msg).__name__)

    def _heard_from_all(self) -> None:
        self._pings.clear()
        self._answered = {r: self._next_ping for r in range(self.workers.world_size)}

    async def _pump_worker(self) -> None:
        inbox = self._inbox
        while True:
            try:
                _, msg = await self.workers.recv()
            except WorkerLost as exc:
                inbox.put_nowait(exc)
                return
            inbox.put_nowait(msg)

    async def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None

    def _fail_step(self, plan: StepPlan, req_ids: list[int], why: str) -> None:
        failed = self.scheduler.fail(req_ids)
        self._fail([s.req_id for s in failed],
                   EngineError(f"Request failed during generation: {why}"))

    # -- replacing the workers ---------------------------------------------------------------

    async def _replace(self, exc: WorkerLost) -> None:
        self.serving = False
        self._lost_at = time.monotonic()
        resumed = self.scheduler.requeue_running()
        log.error("%s; replacing the workers, %d running request(s) will resume", exc,
                  len(resumed))
        if self._recover is None:
            raise exc
        try:
            self.ready = await self._recover()
        except Exception as err:
            log.error("the workers cannot be brought back: %s", err)
            waiting = list(self.scheduler.waiting)
            for seq in waiting:
                self.scheduler.remove_waiting(seq)
            self._fail([s.req_id for s in waiting],
                       Unavailable(f"no healthy worker: the workers cannot be brought back "
                                   f"({err})"))
            raise
        self._inbox = asyncio.Queue()  # nothing from the old workers counts any more
        self._woken = False
        self._pings.clear()
        self._answered.clear()
        self._replaced()
        self.serving = True
        log.info("the workers are back after %.2f s; resuming %d request(s)",
                 time.monotonic() - self._lost_at, len(resumed))
        self.wake()
