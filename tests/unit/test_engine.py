"""AsyncEngine with a fake worker socket: the step loop, events, aborts and failures,
without processes or torch."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loraxd.config.tree import WorkerConfig
from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import (EngineError, FinishEvent, GenerationRequest, TokenEvent,
                                   ValidationError)
from loraxd.protocol.worker import Ready, SeqFailure, SeqOutput, StepResult
from tests.unit.fakes import FakeWorkerSocket, step_ids

BAD_TOKEN = 66  # the fake tokenizer cannot decode it


class FakeTokenizer:
    special_ids = frozenset({0})

    def decode(self, ids, skip_special_tokens=False):
        if BAD_TOKEN in ids:
            raise ValueError("undecodable")
        return "".join(chr(i) for i in ids if i)

    def encode_now(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class FakeWorkers(FakeWorkerSocket):
    """Answers each Step with token `next_token[req_id]` (default 'x') for every sequence,
    except that a sequence in `fail_at` fails alone once it has that many tokens."""

    def __init__(self):
        super().__init__()
        self.next_token: dict[int, int] = {}
        self.fail_at: dict[int, tuple[int, SeqFailure]] = {}
        self.num_tokens: dict[int, int] = {}
        self.steps = []

    def answer(self, step):
        self.steps.append(step)
        outs, failed = [], []
        for i in step_ids(step):
            at, failure = self.fail_at.get(i, (None, None))
            if self.num_tokens.get(i, 0) == at:
                failed.append(failure)
                continue
            self.num_tokens[i] = self.num_tokens.get(i, 0) + 1
            outs.append(SeqOutput(i, self.next_token.get(i, ord("x")), -0.1))
        self.inbox.put_nowait((0, StepResult(step.step_id, outs, 0.0, failed)))


def config():
    return SimpleNamespace(
        model=SimpleNamespace(model_id="m", num_shard=1),
        scheduler=SimpleNamespace(max_batch_prefill_tokens=64, waiting_served_ratio=0.0,
                                  max_waiting_tokens=20, max_concurrent_requests=8,
                                  max_best_of=2, max_stop_sequences=4, max_input_length=32,
                                  max_total_tokens=64, max_batch_total_tokens=256,
                                  prefill_chunk_tokens=0, prefix_caching=True),
        adapters=SimpleNamespace(max_active_adapters=2, adapter_cycle_time_s=1.0,
                                 adapter_source="local", preloaded_adapter_ids=()),
        worker=WorkerConfig())


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
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0
    assert (stats["num_kv_pages_used"], stats["num_requests_held"]) == (0, 0)


async def test_stats_count_the_pages_of_a_running_request(engine):
    gen = engine.generate(GenerationRequest([ord("a")] * 5, max_new_tokens=20))
    await gen.__anext__()
    stats = engine.stats()  # pages of 4 tokens, taken as it grows: 2 to 7 for 25 tokens
    assert 2 <= stats["num_kv_pages_used"] <= 7 and stats["num_requests_held"] == 1
    await gen.aclose()


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


async def test_a_sequence_failing_alone_ends_only_its_request(engine):
    """The worker could not sample requests 2 and 3; request 1, in the same steps, goes on."""
    workers = engine.workers
    workers.fail_at[2] = (3, SeqFailure(2, "the sampling parameters (repetition_penalty=1e-50) "
                                           "make the scores overflow float32", bad_request=True))
    workers.fail_at[3] = (0, SeqFailure(3, "the model's logits are not finite (NaN or inf)"))
    healthy = asyncio.ensure_future(collect(engine, GenerationRequest([ord("a")], 12)))
    await asyncio.sleep(0)
    with pytest.raises(ValidationError, match="Input validation error: the sampling "
                                              "parameters .* overflow") as bad:
        await collect(engine, GenerationRequest([ord("b")], max_new_tokens=10))
    assert bad.value.status == 422
    with pytest.raises(EngineError, match="Request failed during generation: the model's "
                                          "logits are not finite") as broken:
        await collect(engine, GenerationRequest([ord("c")], max_new_tokens=10))
    assert broken.value.status == 500
    events = await healthy
    assert events[-1].generated_text == "x" * 12 and events[-1].finish_reason == "length"
    await asyncio.sleep(0.01)
    assert engine.stats()["num_running"] == 0 and engine.stats()["kv_cache_usage"] == 0
    shared = [s for s in workers.steps if {1, 2} <= set(s.decode_ids)]
    assert shared, "the failing request never shared a step with the healthy one"
    assert {2, 3} <= {i for s in workers.steps for i in s.finished_ids}  # every rank forgets
