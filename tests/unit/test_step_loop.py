"""The step loop's faults, with a fake worker socket: a step that gets no answer, an idle
worker that stops answering pings, a worker that dies; each replaced, with the running
requests resumed; and a restart budget that runs out."""
from __future__ import annotations

import asyncio

import pytest

from loraxd.config.tree import WorkerConfig
from loraxd.daemon.supervisor import RestartBudgetSpent
from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import EngineError, FinishEvent, GenerationRequest, Unavailable
from loraxd.engine.step_loop import StepDeadline
from loraxd.engine.worker_client import WorkerLost
from loraxd.protocol.worker import (FrameRejected, NewSeq, Ready, SamplingParams, SeqOutput, Step,
                                    StepResult)
from tests.unit.fakes import FakeWorkerSocket, step_ids
from tests.unit.test_engine import FakeTokenizer, config

READY = Ready(0, 64, 4, 128, [0], 64, "float32", "cpu", "LlamaForCausalLM")
FAST = WorkerConfig(step_timeout_floor_s=0.3, step_timeout_factor=1.0,
                    heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)


class FaultyWorkers(FakeWorkerSocket):
    """Token i+1 after token i (the first is 'a' + the prompt's length), so a resumed
    sequence shows whether it carried on from the right place. Faults on demand: `hang_at`
    a step id that gets no answer; `mute` stops the Pongs; `die()` loses the worker."""

    def __init__(self):
        super().__init__()
        self.hang_at: int | None = None
        self.mute = False
        self.new_seqs: list[NewSeq] = []
        self.last: dict[int, int] = {}

    async def broadcast(self, msg):
        if self.mute and not isinstance(msg, Step):
            return
        await super().broadcast(msg)

    def answer(self, step):
        self.new_seqs += step.new_seqs
        if step.step_id == self.hang_at:
            return
        outs = []
        for seq in step.new_seqs:
            self.last[seq.req_id] = seq.prompt_ids[-1] if seq.num_generated else 96
        for i in step_ids(step):
            self.last[i] += 1
            outs.append(SeqOutput(i, self.last[i], -0.1))
        self.inbox.put_nowait((0, StepResult(step.step_id, outs, 0.001)))

    def die(self):
        self.inbox.put_nowait(None)

    async def recv(self):
        item = await self.inbox.get()
        if item is None:
            raise WorkerLost("a worker process exited")
        return item


class Recovery:
    """Stands in for Supervisor.replace: new (healthy) workers, or the budget spent."""

    def __init__(self, workers: FaultyWorkers):
        self.workers = workers
        self.calls = 0
        self.spent = False

    async def __call__(self) -> Ready:
        self.calls += 1
        if self.spent:
            raise RestartBudgetSpent("the workers failed 3 times within 600 s")
        self.workers.hang_at, self.workers.mute = None, False
        self.workers.inbox = asyncio.Queue()
        return READY


@pytest.fixture
async def setup():
    workers = FaultyWorkers()
    recover = Recovery(workers)
    cfg = config()
    cfg.worker = FAST
    engine = AsyncEngine(cfg, FakeTokenizer(), workers, READY, recover=recover)
    engine.start()
    yield engine, workers, recover
    await engine.stop()


async def run(engine, n: int, prompt: str = "ab", **sampling) -> list:
    req = GenerationRequest([ord(c) for c in prompt], max_new_tokens=n,
                            sampling=SamplingParams(**sampling), ignore_eos=True)

    async def collect():
        return [e async for e in engine.generate(req)]
    return await asyncio.wait_for(collect(), 10)


def text(events) -> str:
    return events[-1].generated_text


async def test_a_step_with_no_answer_replaces_the_workers_and_the_request_resumes(setup):
    engine, workers, recover = setup
    workers.hang_at = 3  # prefill (0), 2 decodes, then silence
    events = await run(engine, 8)
    assert text(events) == "abcdefgh" and isinstance(events[-1], FinishEvent)
    assert [e.text for e in events[:-1]] == list("abcdefgh")  # each token once, in order
    assert recover.calls == 1
    resumed = workers.new_seqs[-1]
    assert resumed.prompt_ids == [ord(c) for c in "ababc"] and resumed.num_generated == 3
    assert engine.stats()["kv_cache_usage"] == 0 and engine.serving


async def test_an_idle_worker_that_stops_answering_pings_is_replaced(setup):
    engine, workers, recover = setup
    await asyncio.sleep(0.2)
    assert workers.pings >= 2 and recover.calls == 0  # answered pings: nothing happens
    workers.mute = True
    for _ in range(100):
        if recover.calls:
            break
        await asyncio.sleep(0.02)
    assert recover.calls == 1
    assert text(await run(engine, 2)) == "ab"


async def test_a_dead_worker_is_replaced_and_queued_requests_wait_for_the_new_one(setup):
    engine, workers, recover = setup
    workers.hang_at = 2
    first = asyncio.ensure_future(run(engine, 5))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(run(engine, 3, prompt="xyz"))  # queued behind a hung step
    await asyncio.sleep(0.05)
    workers.die()
    assert text(await first) == "abcde" and text(await second) == "abc"
    assert recover.calls == 1


async def test_a_spent_restart_budget_fails_every_request_and_ends_the_loop(setup):
    engine, workers, recover = setup
    recover.spent = True
    workers.hang_at = 1
    with pytest.raises(Unavailable, match="cannot be brought back.*failed 3 times"):
        await run(engine, 5)
    await asyncio.sleep(0.01)
    assert engine.ended and isinstance(engine.failure(), RestartBudgetSpent)
    assert not engine.serving and engine.stalled_for() == float("inf")
    with pytest.raises(Unavailable):
        await run(engine, 1)


async def test_a_step_the_worker_cannot_decode_fails_its_requests_only(setup):
    engine, workers, recover = setup
    original = workers.answer

    def reject_once(step):
        workers.answer = original
        workers.inbox.put_nowait((0, FrameRejected(0, "MessagePack data is malformed")))
    workers.answer = reject_once
    with pytest.raises(EngineError, match="could not decode the step: MessagePack"):
        await run(engine, 3)
    assert text(await run(engine, 2)) == "ab" and recover.calls == 0


def test_the_step_deadline_follows_the_slowest_recent_step():
    deadline = StepDeadline()
    decode8 = Step(1, decode_ids=list(range(8)))
    prefill = Step(2, new_seqs=[NewSeq(1, [0] * 1000, [], SamplingParams())])
    assert deadline.timeout(decode8, 5.0, 10.0) == pytest.approx(5.0 + 10 * 8 * 0.01)
    deadline.observe(decode8, 0.8)  # 0.1 s per token: slower than assumed
    assert deadline.timeout(prefill, 5.0, 10.0) == pytest.approx(5.0 + 10 * 1000 * 0.1)
    for _ in range(60):
        deadline.observe(prefill, 0.5)  # fast now: the estimate decays towards it
    assert deadline.s_per_token == pytest.approx(0.0005)


def test_restarts_back_off_and_stop_at_the_budget():
    from types import SimpleNamespace

    from loraxd.daemon.supervisor import Supervisor
    cfg = SimpleNamespace(model=SimpleNamespace(num_shard=1), worker=WorkerConfig(
        max_restarts=3, restart_window_s=600.0, restart_backoff_s=0.5))
    supervisor = Supervisor(cfg, "/model", workers=None)
    assert [supervisor._count_restart() for _ in range(3)] == [0.5, 1.0, 2.0]
    with pytest.raises(RestartBudgetSpent, match="failed 4 times within 600 s"):
        supervisor._count_restart()
    supervisor._restart_times = type(supervisor._restart_times)(
        t - 601 for t in supervisor._restart_times)  # the window slid past them
    assert supervisor._count_restart() == 0.5
