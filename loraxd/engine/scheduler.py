"""Continuous batching, with no processes and no I/O: `schedule()` plans a step and
`update()` applies its result. Unit tests drive it directly.

Admission follows LoRAX (TGI) semantics. An idle engine admits whatever fits. While a batch
runs, waiting requests join only when there are at least `waiting_served_ratio` × the
running batch of them, or when they have waited `max_waiting_tokens` steps. Every admitted
sequence reserves pages for its whole length (prompt + max_new_tokens), so a running
sequence never runs out of KV cache and nothing is ever preempted.

When the workers are replaced, their KV cache is gone: `requeue_running()` puts the running
sequences back at the head of the queue with what they generated, and once re-admitted they
are prefilled with prompt + generated tokens and carry on.
"""
from __future__ import annotations

import math
import time

import msgspec
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from loraxd.engine.block_manager import BlockManager
from loraxd.engine.request import (EngineError, FinishEvent, PromptToken, TokenEvent,
                                   sequence_failure)
from loraxd.engine.sequence import Sequence
from loraxd.protocol.worker import NewSeq, Step, StepResult


class AdapterSlots(Protocol):
    def acquire(self, seq: Sequence) -> int | None:
        """The device slot for `seq`'s adapter (-1: base), or None while it is not loaded."""

    def release(self, seq: Sequence) -> None: ...

    def enqueue(self, seq: Sequence) -> None:
        """`seq` joined the waiting queue."""

    def dequeue(self, seq: Sequence) -> None:
        """`seq` left the waiting queue (admitted, aborted or failed)."""


class BaseModelOnly:
    def acquire(self, seq: Sequence) -> int | None:
        return -1

    def release(self, seq: Sequence) -> None:
        pass

    def enqueue(self, seq: Sequence) -> None:
        pass

    def dequeue(self, seq: Sequence) -> None:
        pass


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_prefill_tokens: int
    waiting_served_ratio: float
    max_waiting_tokens: int


@dataclass
class StepPlan:
    step: Step
    seqs: dict[int, Sequence] = field(default_factory=dict)  # req_id -> seq in this step
    # Why new sequences join a running batch: "backpressure" (enough of them wait),
    # "wait_exceeded" (they waited max_waiting_tokens steps); None: no batch was running.
    join_reason: str | None = None


Event = tuple[int, TokenEvent | FinishEvent | EngineError]  # an error ends its request


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager,
                 eos_ids: frozenset[int], special_ids: frozenset[int],
                 decode_one: Callable[[int], str], adapters: AdapterSlots | None = None):
        self.limits = limits
        self.blocks = blocks
        self.eos_ids = eos_ids
        self.special_ids = special_ids
        self.decode_one = decode_one
        self.adapters = adapters or BaseModelOnly()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._reserved_blocks = 0
        self._to_free: list[int] = []  # req_ids the workers must forget in the next step
        self._steps_since_admission = 0
        self._next_step_id = 0

    # -- queue -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.adapters.enqueue(seq)

    def abort(self, req_id: int) -> bool:
        """Drop a request wherever it is; True if it was known."""
        if req_id in self.running:
            self._retire(self.running.pop(req_id))
            return True
        for seq in self.waiting:
            if seq.req_id == req_id:
                self.remove_waiting(seq)
                return True
        return False

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.adapters.dequeue(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._to_free)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_reserved_blocks(self) -> int:
        """Pages promised to the running sequences for their whole length (admission's
        budget; the pages allocated so far are fewer)."""
        return self._reserved_blocks

    # -- planning ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        join_reason = "backpressure" if self.running else None
        if self.running and self._steps_since_admission + 1 >= self.limits.max_waiting_tokens:
            join_reason = "wait_exceeded"
        admitted = self._admit()
        if not admitted and not self.running and not self._to_free:
            return None  # nothing runnable (requests may wait for an adapter)
        plan_seqs: dict[int, Sequence] = {}
        new_seqs = []
        for seq in admitted:
            seq.block_ids = self.blocks.allocate(self.blocks.blocks_for(seq.context_len))
            if seq.started is None:
                seq.started = time.monotonic()
            new_seqs.append(_new_seq(seq))
            plan_seqs[seq.req_id] = seq
        decode_ids, new_blocks = [], {}
        for req_id, seq in self.running.items():
            if seq.num_cached >= len(seq.block_ids) * self.blocks.block_size:
                page = self.blocks.allocate(1)
                seq.block_ids.extend(page)
                new_blocks[req_id] = page
            decode_ids.append(req_id)
            plan_seqs[req_id] = seq
        for seq in admitted:
            self.running[seq.req_id] = seq
        step = Step(self._next_step_id, new_seqs, decode_ids, new_blocks, self._to_free)
        self._next_step_id += 1
        self._to_free = []
        return StepPlan(step, plan_seqs, join_reason if admitted else None)

    def _admit(self) -> list[Sequence]:
        if not self.waiting:
            return []
        if self.running:
            self._steps_since_admission += 1
            if self._steps_since_admission < self.limits.max_waiting_tokens:
                min_size = math.floor(len(self.running) * self.limits.waiting_served_ratio)
                if len(self.waiting) < max(min_size, 1):
                    return []
        admitted, prefill_tokens = [], 0
        for seq in list(self.waiting):
            need = self.blocks.blocks_for(seq.max_len)
            if self._reserved_blocks + need > self.blocks.num_blocks:
                break  # FIFO: the head waits for room rather than being overtaken forever
            if admitted and (prefill_tokens + seq.context_len
                             > self.limits.max_batch_prefill_tokens):
                break
            slot = self.adapters.acquire(seq)
            if slot is None:
                continue  # its adapter is still loading; others go ahead
            seq.adapter_slot = slot
            self._reserved_blocks += need
            prefill_tokens += seq.context_len
            admitted.append(seq)
            self.remove_waiting(seq)
        if admitted:
            self._steps_since_admission = 0
        return admitted

    # -- results -----------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Event]:
        events = self._fail_alone(plan, result)
        for out in result.outputs:
            seq = self.running.get(out.req_id)
            if seq is None or plan.seqs.get(out.req_id) is not seq:
                continue  # aborted while the step ran
            if seq.num_cached == 0 and out.prompt_logprobs is not None:
                seq.prefill = self._prompt_tokens(seq, out.prompt_logprobs)
            seq.num_cached = seq.prompt_len + len(seq.output_ids)
            events.append((seq.req_id, seq.append(out, self.eos_ids, self.special_ids,
                                                  self.decode_one)))
            if seq.finish_reason is not None:
                events.append((seq.req_id, seq.finish_event()))
                self._retire(self.running.pop(seq.req_id))
        return events

    def _fail_alone(self, plan: StepPlan, result: StepResult) -> list[Event]:
        """The sequences the worker failed alone: retired, each with its error."""
        events: list[Event] = []
        for failure in result.failed:
            seq = self.running.get(failure.req_id)
            if seq is None or plan.seqs.get(failure.req_id) is not seq:
                continue  # aborted while the step ran
            self._retire(self.running.pop(seq.req_id))
            events.append((seq.req_id, sequence_failure(failure.message, failure.bad_request)))
        return events

    def fail(self, req_ids: list[int]) -> list[Sequence]:
        """Remove requests whose step failed; the caller tells their clients."""
        failed = [self.running.pop(i) for i in req_ids if i in self.running]
        for seq in failed:
            self._retire(seq)
        return failed

    def requeue_running(self) -> list[Sequence]:
        """The workers were replaced and their state is gone: every running sequence goes
        back to the head of the queue, in order, keeping the tokens it generated."""
        seqs = list(self.running.values())
        for seq in seqs:
            self._retire(seq, tell_workers=False)
            seq.num_cached = 0
            seq.adapter_slot = -1
        self.running.clear()
        self._to_free = []
        for seq in reversed(seqs):
            self.waiting.appendleft(seq)
            self.adapters.enqueue(seq)
        return seqs

    def _retire(self, seq: Sequence, tell_workers: bool = True) -> None:
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        self._reserved_blocks -= self.blocks.blocks_for(seq.max_len)
        self.adapters.release(seq)
        if tell_workers:
            self._to_free.append(seq.req_id)

    def _prompt_tokens(self, seq: Sequence, logprobs: list[float]) -> tuple[PromptToken, ...]:
        ids = seq.request.prompt_ids
        first = PromptToken(ids[0], self.decode_one(ids[0]), None)
        return (first,) + tuple(PromptToken(i, self.decode_one(i), lp)
                                for i, lp in zip(ids[1:], logprobs))


def _new_seq(seq: Sequence) -> NewSeq:
    sampling = seq.request.sampling
    if seq.output_ids and sampling.prompt_logprobs:  # a resume: the prompt's were sent
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=False)
    return NewSeq(seq.req_id, seq.context_ids, seq.block_ids, sampling, seq.adapter_slot,
                  num_generated=len(seq.output_ids))
