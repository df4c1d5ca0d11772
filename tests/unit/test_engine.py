"""AsyncEngine with a fake worker socket: the step loop, events, aborts and failures,
without processes or torch."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import EngineError, FinishEvent, GenerationRequest, TokenEvent
from loraxd.protocol.worker import Ready, SeqOutput, StepResult

BAD_TOKEN = 66  # the fake tokenizer cannot decode it


class FakeTokenizer:
    special_ids = frozenset({0})

    def decode(self, ids, skip_special_tokens=False):
        if BAD_TOKEN in ids:
            raise ValueError("undecodable")
        return "".join(chr(i) for i in ids if i)

    def encode_now(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class FakeWorkers:
    """Answers each Step with token `next_token[req_id]` (default 'x') for every sequence."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.next_token: dict[int, int] = {}
        self.steps = []

    async def broadcast(self, step):
        self.steps.append(step)
        ids = [n.req_id for n in step.new_seqs] + list(step.decode_ids)
        outs = [SeqOutput(i, self.next_token.get(i, ord("x")), -0.1) for i in ids]
        self.inbox.put_nowait((0, StepResult(step.step_id, outs, 0.0)))

    async def recv(self):
        return await self.inbox.get()


def config():
    return SimpleNamespace(
        model=SimpleNamespace(model_id="m", num_shard=1),
        scheduler=SimpleNamespace(max_batch_prefill_tokens=64, waiting_served_ratio=0.0,
                                  max_waiting_tokens=20, max_concurrent_requests=8,
                                  max_best_of=2, max_stop_sequences=4, max_input_length=32,
                                  max_total_tokens=64, max_batch_total_tokens=256),
        adapters=SimpleNamespace(max_active_adapters=2, adapter_cycle_time_s=1.0,
                                 adapter_source="local", preloaded_adapter_ids=()))


@pytest.fixture
async def engine():
    workers = FakeWorkers()
    ready = Ready(0, 64, 4, 128, [0], 64, "float32", "cpu", "LlamaForCausalLM")
    eng = AsyncEngine(config(), FakeTokenizer(), workers, ready, recover=None)
    eng.start()
    yield eng
    await eng.stop()


async def collect(eng, req):
    async def run():
        return [e async for e in eng.generate(req)]
    return await asyncio.wait_for(run(), 5)  # a dead step loop would hang forever


async def test_generates_until_length_and_frees_everything(engine):
    events = await collect(engine, GenerationRequest([ord("a")], max_new_tokens=3))
    assert [type(e) for e in events] == [TokenEvent] * 3 + [FinishEvent]
    assert events[-1].generated_text == "xxx" and events[-1].finish_reason == "length"
    await asyncio.sleep(0.01)
    assert engine.stats()["num_running"] == 0 and engine.stats()["kv_cache_usage"] == 0


async def test_closing_the_stream_aborts_the_request(engine):
    gen = engine.generate(GenerationRequest([ord("a")], max_new_tokens=50))
    await gen.__anext__()
    await gen.aclose()
    await asyncio.sleep(0.01)
    assert engine.stats()["num_running"] == 0
    assert any(1 in s.finished_ids for s in engine.workers.steps)


async def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine):
    engine.workers.next_token[1] = BAD_TOKEN  # request 1's token breaks detokenization
    with pytest.raises(EngineError, match="Request failed during generation"):
        await collect(engine, GenerationRequest([ord("a")], max_new_tokens=3))
    events = await collect(engine, GenerationRequest([ord("b")], max_new_tokens=2))
    assert events[-1].generated_text == "xx"
    assert engine.stats()["kv_cache_usage"] == 0
