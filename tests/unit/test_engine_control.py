"""What the service asks of the engine: drain and resume, cancel, the heartbeat, the request
log lines, the workers' log level. A fake worker socket that can hold its answers stands in for a hung worker."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import EngineError, FinishEvent, GenerationRequest, Unavailable
from loraxd.logs import JsonFormatter
from loraxd.protocol.worker import Ready, SetLogLevel, Step
from tests.unit.fakes import FakeWorkerSocket
from tests.unit.test_engine import config


class FakeTokenizer:
    special_ids = frozenset({0})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i)

    def encode_now(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class GatedWorkers(FakeWorkerSocket):
    """Answers every step with an 'x' per sequence, once `gate` is set (a hung worker
    while it is clear)."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    def answer(self, step):
        async def later():
            await self.gate.wait()
            super(GatedWorkers, self).answer(step)
        asyncio.ensure_future(later())


@pytest.fixture
async def engine():
    ready = Ready(0, 64, 4, 128, [0], 64, "float32", "cpu", "LlamaForCausalLM")
    eng = AsyncEngine(config(), FakeTokenizer(), GatedWorkers(), ready, recover=None)
    eng.start()
    yield eng
    eng.workers.gate.set()
    await eng.stop()


def request(n: int = 3) -> GenerationRequest:
    return GenerationRequest([ord("a")], max_new_tokens=n)


async def run(eng, req):
    return await asyncio.wait_for(_collect(eng, req), 5)


async def _collect(eng, req):
    return [e async for e in eng.generate(req)]


async def test_a_drain_refuses_new_requests_and_lets_running_ones_finish(engine):
    engine.workers.gate.clear()
    running = asyncio.ensure_future(run(engine, request(3)))
    await asyncio.sleep(0.05)
    engine.drain()
    assert engine.draining and engine.num_requests == 1
    with pytest.raises(Unavailable, match="draining"):
        await run(engine, request())
    assert not await engine.health()  # the probe is a request like any other
    engine.workers.gate.set()
    events = await running
    assert isinstance(events[-1], FinishEvent) and events[-1].generated_tokens == 3
    assert engine.num_requests == 0
    engine.resume()
    assert not engine.draining
    assert isinstance((await run(engine, request(1)))[-1], FinishEvent)


async def test_the_heartbeat_goes_stale_while_a_step_waits_for_the_workers(engine):
    assert engine.stalled_for() == 0.0
    engine.workers.gate.clear()
    pending = asyncio.ensure_future(run(engine, request(2)))
    await asyncio.sleep(0.2)
    assert engine.stalled_for() >= 0.15
    engine.workers.gate.set()
    await pending
    await asyncio.sleep(0.01)
    assert engine.stalled_for() == 0.0


async def test_the_heartbeat_is_infinite_once_the_step_loop_ended(engine):
    engine._task.cancel()
    await asyncio.gather(engine._task, return_exceptions=True)
    assert engine.stalled_for() == float("inf")


async def test_cancel_ends_a_request_with_an_error(engine):
    engine.workers.gate.clear()
    gen = engine.generate(request(50))
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.05)
    [req_id] = list(engine.scheduler.running) or [s.req_id for s in engine.scheduler.waiting]
    assert engine.cancel(req_id)
    with pytest.raises(EngineError, match="cancelled by the operator"):
        await asyncio.wait_for(first, 5)
    assert not engine.cancel(req_id) and not engine.cancel(999)
    engine.workers.gate.set()
    await asyncio.sleep(0.05)
    assert engine.stats()["num_running"] == 0 and engine.num_requests == 0


async def test_one_log_line_per_request_with_its_id_and_none_for_probes(engine, caplog):
    caplog.set_level(logging.INFO, logger="loraxd.engine.engine")
    await run(engine, request(2))
    engine._last_step_done = 0.0  # force a probe
    assert await engine.health()
    lines = [r for r in caplog.records if getattr(r, "request_id", None) is not None]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith(f"request {lines[0].request_id} finished (length)")
    entry = json.loads(JsonFormatter("loraxd").format(lines[0]))
    assert entry["request_id"] == lines[0].request_id and entry["level"] == "info"


async def test_a_log_level_goes_to_the_workers_between_two_steps(engine):
    sent = engine.workers.sent
    engine.set_worker_log_level("debug")  # idle: sent at once
    await asyncio.sleep(0.01)
    assert sent == [SetLogLevel("debug")]
    engine.workers.gate.clear()
    running = asyncio.ensure_future(run(engine, request(3)))
    await asyncio.sleep(0.05)
    engine.set_worker_log_level("warning")
    engine.set_worker_log_level("info")  # only the last one counts
    await asyncio.sleep(0.05)
    assert [type(m) for m in sent] == [SetLogLevel, Step]  # never while a step is out
    engine.workers.gate.set()
    assert isinstance((await running)[-1], FinishEvent)
    assert sent[2] == SetLogLevel("info") and len(sent) > 3
    assert all(isinstance(m, Step) for m in sent[3:])
