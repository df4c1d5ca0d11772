"""Continuous batching, with no processes and no I/O: `schedule()` plans a step and
`update()` applies its result. Unit tests drive it directly.

Admission follows LoRAX (TGI) semantics. An idle engine admits whatever fits. While a batch
runs, waiting requests join only when there are at least `waiting_served_ratio` × the
running batch of them, or when they have waited `max_waiting_tokens` steps.

A step computes at most `max_batch_prefill_tokens` prompt tokens. While sequences decode,
prompts longer than `prefill_chunk_tokens` share that many tokens per step: a long prompt is
prefilled in slices over several steps, between which the others keep decoding, so it never
stalls every stream; shorter prompts join whole, as a burst of requests must.

KV pages are taken as a sequence grows, not reserved for its whole length. A sequence is
admitted when its first slice fits with a page of growth to spare for each running one;
when a step's pages run out all the same, the newest sequence is preempted: it goes back to
the head of the queue with what it generated, its pages stay in the prefix cache, and once
re-admitted it carries on from there (recomputing what the cache lost).

The prefix cache (see block_manager.py): a sequence's context (prompt, then generated
tokens) is looked up page by page under the key of its adapter's load, and the pages found
are taken instead of computed. A request asking for prompt logprobs computes its whole
prompt (the logprobs need every logit).

When the workers are replaced, their KV cache is gone: `requeue_running()` puts the running
sequences back at the head of the queue the same way.
"""
from __future__ import annotations

import math
import time

import msgspec
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from loraxd.engine.block_manager import BlockManager, page_keys, root_key
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

    def kv_identity(self, seq: Sequence) -> object:
        """What `seq`'s K/V are computed under, once acquired: equal for two sequences only
        when the same weights compute them (the same load of the same adapter)."""


class BaseModelOnly:
    def acquire(self, seq: Sequence) -> int | None:
        return -1

    def release(self, seq: Sequence) -> None:
        pass

    def enqueue(self, seq: Sequence) -> None:
        pass

    def dequeue(self, seq: Sequence) -> None:
        pass

    def kv_identity(self, seq: Sequence) -> object:
        return "base"


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_prefill_tokens: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    prefill_chunk_tokens: int = 0  # 0: no slices, a prompt is prefilled in one step

    @classmethod
    def from_config(cls, sched) -> "SchedulerLimits":
        return cls(sched.max_batch_prefill_tokens, sched.waiting_served_ratio,
                   sched.max_waiting_tokens, sched.prefill_chunk_tokens)


@dataclass
class StepPlan:
    step: Step
    seqs: dict[int, Sequence] = field(default_factory=dict)  # req_id -> seq in this step
    # Why new sequences join a running batch: "backpressure" (enough of them wait),
    # "wait_exceeded" (they waited max_waiting_tokens steps); None: no batch was running.
    join_reason: str | None = None
    # sequences whose prefill goes on after this step: req_id -> tokens cached after it
    partial: dict[int, int] = field(default_factory=dict)


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
        self.running: dict[int, Sequence] = {}  # in admission order
        self.prefilling: dict[int, Sequence] = {}  # running, prompt not all computed yet
        self._to_free: list[int] = []  # req_ids the workers must forget in the next step
        self._to_clear: list[int] = []  # pages the workers must zero in the next step
        self._steps_since_admission = 0
        self._next_step_id = 0
        self.num_preempted = 0
        self.prefix_queried_tokens = 0  # context tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found there

    # -- queue -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.adapters.enqueue(seq)

    def abort(self, req_id: int) -> bool:
        """Drop a request wherever it is; True if it was known."""
        if req_id in self.running:
            self._retire(self._pop_running(req_id))
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

    # -- planning ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        decoding = [s for s in self.running.values() if s.req_id not in self.prefilling]
        join_reason = "backpressure" if self.running else None
        if self.running and self._steps_since_admission + 1 >= self.limits.max_waiting_tokens:
            join_reason = "wait_exceeded"
        budget = self.limits.max_batch_prefill_tokens
        slice_size = budget  # a longer prompt is sliced; while others decode, the slices of
        if decoding and self.limits.prefill_chunk_tokens:  # all prompts share one slice
            slice_size = min(budget, self.limits.prefill_chunk_tokens)
        slices = slice_size
        new_blocks: dict[int, list[int]] = {}
        for seq in decoding:  # oldest first: the newest make room
            if (seq.req_id in self.running
                    and seq.num_cached >= len(seq.block_ids) * self.blocks.block_size):
                page = self._grow(seq, 1, new_blocks)
                if page:
                    new_blocks[seq.req_id] = page
        chunks: dict[int, int] = {}
        for seq in list(self.prefilling.values()):
            if slices <= 0:
                break
            if seq.req_id not in self.running:
                continue  # preempted to make room
            n = min(seq.context_len - seq.num_cached, slices)
            need = self.blocks.blocks_for(seq.num_cached + n) - len(seq.block_ids)
            pages = self._grow(seq, need, new_blocks)
            if pages is not None:
                if pages:
                    new_blocks[seq.req_id] = pages
                chunks[seq.req_id] = n
                budget -= n
                slices -= n
        # before admission: a sequence preempted above may be admitted again below
        decode_ids = [s.req_id for s in decoding if s.req_id in self.running]
        chunks = {i: n for i, n in chunks.items() if i in self.running}
        new_blocks = {i: p for i, p in new_blocks.items() if i in self.running}
        admitted = self._admit(budget, slices, slice_size)
        if not admitted and not self.running and not self._to_free:
            return None  # nothing runnable (requests may wait for an adapter)
        plan = StepPlan(Step(self._next_step_id), join_reason=join_reason if admitted else None)
        new_seqs = []
        for seq, n in admitted:
            if seq.started is None:
                seq.started = time.monotonic()
            new_seqs.append(_new_seq(seq, n))
            self.running[seq.req_id] = seq
            self._note_prefill(plan, seq, n)
        for req_id, n in chunks.items():
            self._note_prefill(plan, self.running[req_id], n)
        plan.seqs.update((i, self.running[i]) for i in decode_ids)
        plan.step = Step(self._next_step_id, new_seqs, decode_ids, new_blocks, self._to_free,
                         prefill_chunks=chunks, clear_blocks=self._to_clear)
        self._next_step_id += 1
        self._to_free, self._to_clear = [], []
        return plan

    def _note_prefill(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        plan.seqs[seq.req_id] = seq
        if seq.num_cached + n < seq.context_len:
            self.prefilling[seq.req_id] = seq
            plan.partial[seq.req_id] = seq.num_cached + n
        else:
            self.prefilling.pop(seq.req_id, None)

    def _grow(self, seq: Sequence, n: int, planned: dict[int, list[int]]) -> list[int] | None:
        """`n` more pages for running `seq`, preempting the newest sequences while there
        are not enough; None when `seq` itself had to go."""
        while self.blocks.num_free < n:
            victim = next(reversed(self.running.values()))
            self._preempt(victim)
            if victim is seq:
                return None
            planned.pop(victim.req_id, None)  # they went back with its other pages
        pages = self.blocks.allocate(n)
        seq.block_ids.extend(pages)
        return pages

    def _preempt(self, seq: Sequence) -> None:
        self._retire(self._pop_running(seq.req_id))
        seq.num_cached = 0
        seq.adapter_slot = -1
        self.waiting.appendleft(seq)
        self.adapters.enqueue(seq)
        self.num_preempted += 1

    def _admit(self, budget: int, slices: int, slice_size: int) -> list[tuple[Sequence, int]]:
        """Sequences that join this step, each with the tokens it computes in it: a prompt
        of up to `slice_size` tokens whole, a longer one a slice of the `slices` left."""
        if not self.waiting or budget <= 0:
            return []
        if self.running:
            self._steps_since_admission += 1
            if self._steps_since_admission < self.limits.max_waiting_tokens:
                min_size = math.floor(len(self.running) * self.limits.waiting_served_ratio)
                if len(self.waiting) < max(min_size, 1):
                    return []
        admitted: list[tuple[Sequence, int]] = []
        spare = len(self.running)  # a page of growth for each running sequence
        for seq in list(self.waiting):
            if budget <= 0:
                break
            whole = seq.request.sampling.prompt_logprobs or not self.limits.prefill_chunk_tokens
            if whole and admitted and seq.context_len > budget:
                break
            slot = self.adapters.acquire(seq)
            if slot is None:
                continue  # its adapter is still loading; others go ahead
            cached = self._take_prefix(seq)
            n = seq.context_len - seq.num_cached
            sliced = not whole and n > min(budget, slice_size)
            if sliced:
                n = min(budget, slices)
            need = self.blocks.blocks_for(seq.num_cached + n) - len(cached)
            if n <= 0 or need + spare + len(admitted) > self.blocks.num_free:
                self.blocks.free(cached)  # FIFO: the head waits for room
                seq.block_ids, seq.num_cached = [], 0
                self.adapters.release(seq)
                break
            seq.adapter_slot = slot
            seq.block_ids = cached + self.blocks.allocate(need)
            budget -= n
            if sliced:
                slices -= n
            admitted.append((seq, n))
            self.remove_waiting(seq)
        if admitted:
            self._steps_since_admission = 0
        return admitted

    def _take_prefix(self, seq: Sequence) -> list[int]:
        """The cached pages that start `seq`'s context (sets num_cached); at least its last
        token is left to compute, for the logits."""
        seq.kv_root = root_key(self.adapters.kv_identity(seq))
        seq.page_keys = []
        if seq.request.sampling.prompt_logprobs:
            return []
        context = seq.context_ids
        keys = page_keys(seq.kv_root, context[:-1], self.blocks.block_size, seq.page_keys)
        hit = self.blocks.cached_prefix(keys)
        self.prefix_queried_tokens += len(context)
        self.prefix_hit_tokens += hit * self.blocks.block_size
        seq.num_cached = hit * self.blocks.block_size
        seq.num_keyed = hit
        return self.blocks.take_cached(keys[:hit])

    # -- results -----------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Event]:
        events = self._fail_alone(plan, result)
        for req_id, num_cached in plan.partial.items():
            seq = self.running.get(req_id)
            if seq is plan.seqs[req_id]:
                seq.num_cached = num_cached
                self._key_pages(seq)
        for out in result.outputs:
            seq = self.running.get(out.req_id)
            if seq is None or plan.seqs.get(out.req_id) is not seq:
                continue  # aborted while the step ran
            if seq.num_cached == 0 and out.prompt_logprobs is not None:
                seq.prefill = self._prompt_tokens(seq, out.prompt_logprobs)
            seq.num_cached = seq.prompt_len + len(seq.output_ids)
            self._key_pages(seq)
            events.append((seq.req_id, seq.append(out, self.eos_ids, self.special_ids,
                                                  self.decode_one)))
            if seq.finish_reason is not None:
                events.append((seq.req_id, seq.finish_event()))
                self._retire(self._pop_running(seq.req_id))
        return events

    def _key_pages(self, seq: Sequence) -> None:
        """Enter the pages `seq` filled into the prefix cache."""
        bs = self.blocks.block_size
        full = seq.num_cached // bs
        if full <= seq.num_keyed:
            return
        keys = page_keys(seq.kv_root, seq.context_ids[:full * bs], bs, seq.page_keys)
        for i in range(seq.num_keyed, full):
            self.blocks.register(seq.block_ids[i], keys[i])
        seq.num_keyed = full

    def _fail_alone(self, plan: StepPlan, result: StepResult) -> list[Event]:
        """The sequences the worker failed alone: retired, each with its error."""
        events: list[Event] = []
        for failure in result.failed:
            seq = self.running.get(failure.req_id)
            if seq is None or plan.seqs.get(failure.req_id) is not seq:
                continue  # aborted while the step ran
            self._retire(self._pop_running(seq.req_id), failed=True)
            events.append((seq.req_id, sequence_failure(failure.message, failure.bad_request)))
        return events

    def fail(self, req_ids: list[int]) -> list[Sequence]:
        """Remove requests whose step failed; the caller tells their clients."""
        failed = [self._pop_running(i) for i in req_ids if i in self.running]
        for seq in failed:
            self._retire(seq, failed=True)
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
        self.prefilling.clear()
        self.blocks.forget_cached()
        self._to_free, self._to_clear = [], []  # the new workers start with zeroed pages
        for seq in reversed(seqs):
            self.waiting.appendleft(seq)
            self.adapters.enqueue(seq)
        return seqs

    def _pop_running(self, req_id: int) -> Sequence:
        self.prefilling.pop(req_id, None)
        return self.running.pop(req_id)

    def _retire(self, seq: Sequence, tell_workers: bool = True, failed: bool = False) -> None:
        """`failed`: its K/V may hold NaN or inf; its pages leave the prefix cache, and the
        workers zero the ones nobody else uses (masked reads must never see NaN)."""
        released = self.blocks.free(seq.block_ids, keep=not failed)
        if failed:
            self._to_clear.extend(released)
        seq.block_ids = []
        self.adapters.release(seq)
        if tell_workers:
            self._to_free.append(seq.req_id)

    def _prompt_tokens(self, seq: Sequence, logprobs: list[float]) -> tuple[PromptToken, ...]:
        ids = seq.request.prompt_ids
        first = PromptToken(ids[0], self.decode_one(ids[0]), None)
        return (first,) + tuple(PromptToken(i, self.decode_one(i), lp)
                                for i, lp in zip(ids[1:], logprobs))


def _new_seq(seq: Sequence, num_tokens: int) -> NewSeq:
    sampling = seq.request.sampling
    if seq.output_ids and sampling.prompt_logprobs:  # a resume: the prompt's were sent
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=False)
    return NewSeq(seq.req_id, seq.context_ids, seq.block_ids, sampling, seq.adapter_slot,
                  num_generated=len(seq.output_ids), num_cached=seq.num_cached,
                  num_computed=num_tokens)
