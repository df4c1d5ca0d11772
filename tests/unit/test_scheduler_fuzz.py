"""The scheduler against a worker that checks every Step the way ModelRunner does (who is
prefilling, who is decoding, whether the pages hold the tokens), over random workloads:
arrivals, prompt lengths, a small KV cache (preemption), the prefix cache, slices, aborts.
The cache always holds one sequence whole, as the configuration checks insist."""
from __future__ import annotations

import random

import pytest

from loraxd.engine.block_manager import BlockManager
from loraxd.engine.request import FinishEvent
from loraxd.engine.scheduler import Scheduler, SchedulerLimits
from loraxd.protocol.worker import SeqOutput, Step, StepResult
from tests.unit.test_scheduler import EOS, make_seq


class CheckingWorker:
    def __init__(self, block_size: int):
        self.bs = block_size
        self.seqs: dict[int, dict] = {}  # req_id -> num_cached, end, pages

    def execute(self, step: Step) -> list[SeqOutput]:
        for req_id in step.finished_ids:
            self.seqs.pop(req_id, None)
        for req_id, pages in step.new_blocks.items():
            assert req_id in self.seqs, f"pages for {req_id}, not running"
            self.seqs[req_id]["pages"] += pages
        work = []
        for new in step.new_seqs:
            assert new.req_id not in self.seqs or new.req_id in step.finished_ids
            n = new.num_computed or len(new.prompt_ids) - new.num_cached
            self.seqs[new.req_id] = {"cached": new.num_cached, "end": len(new.prompt_ids),
                                     "pages": list(new.block_ids)}
            work.append((new.req_id, n))
        for req_id, n in step.prefill_chunks.items():
            state = self.seqs.get(req_id)
            assert state is not None and state["cached"] < state["end"], \
                f"{req_id} is not prefilling"
            work.append((req_id, n))
        for req_id in step.decode_ids:
            state = self.seqs.get(req_id)
            assert state is not None and state["cached"] >= state["end"], \
                f"{req_id} is not decoding"
            work.append((req_id, 1))
        outputs = []
        for req_id, n in work:
            state = self.seqs[req_id]
            assert 0 < n and state["cached"] + n <= max(state["end"], state["cached"] + 1)
            assert len(state["pages"]) * self.bs >= state["cached"] + n, "pages too few"
            state["cached"] += n
            if state["cached"] >= state["end"]:
                outputs.append(SeqOutput(req_id, 120 + req_id % 5, -0.1))
        return outputs


def step(s: Scheduler, worker: CheckingWorker, wanted: dict, done: set) -> bool:
    """One step planned, run and applied; False when there was nothing to run."""
    plan = s.schedule()
    if plan is None:
        return False
    outputs = worker.execute(plan.step)
    for req_id, event in s.update(plan, StepResult(plan.step.step_id, outputs, 0.0)):
        if isinstance(event, FinishEvent):
            assert event.generated_tokens == wanted[req_id]
            done.add(req_id)
    return True


@pytest.mark.parametrize("seed", range(100))
def test_random_workloads_keep_scheduler_and_worker_in_step(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 16])
    s = Scheduler(SchedulerLimits(rng.choice([32, 64, 256]), rng.choice([0.0, 1.2]),
                                  rng.choice([3, 20]), rng.choice([0, 4, 16, 64])),
                  BlockManager(rng.randint(32, 80), bs, prefix_caching=rng.random() < 0.8),
                  eos_ids=frozenset({EOS}), special_ids=frozenset({EOS}), decode_one=chr)
    worker = CheckingWorker(bs)
    prompts = ["abcdefgh" * k for k in range(1, 5)] + ["xyz", "abcdefghijklmnop"]
    next_id, done, wanted = 1, set(), {}
    for _ in range(400):
        if rng.random() < 0.3 and next_id < 60:
            max_new = rng.randint(1, 24)
            prompt = rng.choice(prompts) + rng.choice(["", "q", "rs"])
            s.add(make_seq(next_id, prompt=prompt, max_new=max_new, ignore_eos=True))
            wanted[next_id] = max_new
            next_id += 1
        if rng.random() < 0.03 and s.running:
            victim = rng.choice(list(s.running))
            s.abort(victim)
            done.add(victim)
        step(s, worker, wanted, done)
        assert s.blocks.num_used + s.blocks.num_free == s.blocks.num_blocks
    while s.has_work() and step(s, worker, wanted, done):  # drain: everything finishes
        pass
    assert done == set(wanted)
    assert s.blocks.num_used == 0
