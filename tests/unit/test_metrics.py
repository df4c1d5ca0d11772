"""GET /metrics against fake engines, read back with prometheus-client's own parser: every
series is there, each moves with what happened, labels stay bounded and escaped."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from loraxd.engine.request import AdapterRef, EngineError, MergedAdapters
from loraxd.engine.scheduler import StepPlan
from loraxd.http.app import make_app
from loraxd.http.metrics import wants_json
from loraxd.http.metrics_scrape import snapshot
from loraxd.protocol.worker import NewSeq, SamplingParams, Step, StepFailed, StepResult
from tests.unit.test_http_native import FakeEngine, make_config

LORAX_COUNTERS = ["lorax_request_count", "lorax_request_success", "lorax_request_failure",
                  "lorax_batch_inference_count", "lorax_batch_inference_success",
                  "lorax_batch_inference_failure", "lorax_batch_concat"]
LORAX_HISTOGRAMS = ["lorax_request_duration", "lorax_request_validation_duration",
                    "lorax_request_queue_duration", "lorax_request_inference_duration",
                    "lorax_request_mean_time_per_token_duration", "lorax_request_input_length",
                    "lorax_request_max_new_tokens", "lorax_request_generated_tokens",
                    "lorax_batch_inference_duration", "lorax_batch_next_size"]
LORAX_GAUGES = ["lorax_queue_size", "lorax_batch_current_size", "lorax_batch_current_max_tokens"]
GATEWAY_GAUGES = ["vllm:num_requests_waiting", "vllm:num_requests_running",
                  "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                  "vllm:lora_requests_info"]
ADAPTER_SERIES = {"loraxd_adapter_requests": "counter", "loraxd_adapter_prompt_tokens": "counter",
                  "loraxd_adapter_generated_tokens": "counter",
                  "loraxd_adapter_request_duration_seconds": "histogram",
                  "loraxd_adapter_load_duration_seconds": "histogram",
                  "loraxd_adapter_tier": "gauge", "loraxd_adapters_by_tier": "gauge"}


def entry(adapter_id, *, status="loaded", running=0, waiting=0, token=None, path=None):
    ref = AdapterRef(adapter_id, "hub", token)
    return SimpleNamespace(key=f"hub:{adapter_id}", ref=ref, status=status, num_running=running,
                           num_waiting=waiting, path=path or f"/cache/{adapter_id}")


class StatsEngine(FakeEngine):
    """A FakeEngine with read-outs and the step and adapter-move hooks."""

    def __init__(self, entries=(), num_slots=4, host_cached=(), **stats):
        super().__init__()
        self._stats = {"num_waiting": 5, "num_running": 3, "kv_cache_usage": 0.375,
                       "num_steps": 1200, "batch_max_tokens": 96, "num_kv_pages_used": 12,
                       "num_kv_pages_cached": 20, "num_requests_held": 9, "num_preempted": 2,
                       "prefix_queried_tokens": 1000, "prefix_hit_tokens": 640, **stats}
        self.adapters = SimpleNamespace(entries={e.key: e for e in entries},
                                        slots=[None] * num_slots, timing_observers=[])
        self.steps = SimpleNamespace(step_observers=[])
        self.host_cached = frozenset(host_cached)

    def stats(self) -> dict:
        return dict(self._stats)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    for s in fams[name].samples:
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, sample, labels))


@pytest.fixture
async def serve():
    clients = []

    async def start(engine, **config):
        client = TestClient(TestServer(make_app(engine, make_config(**config))))
        await client.start_server()
        clients.append(client)
        return client
    yield start
    for client in clients:
        await client.close()


async def scrape(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return families(await resp.text())


def generate(client, adapter=None, **params):
    if adapter is not None:
        params["adapter_id"] = adapter
    return client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3,
                                                                          **params}})


async def test_every_series_is_there_with_its_type(serve):
    engine = StatsEngine([entry("a", running=1)])
    client = await serve(engine)
    assert (await generate(client)).status == 200
    fams = await scrape(client)
    for name in LORAX_COUNTERS:
        assert fams[name].type == "counter", name
    for name in LORAX_HISTOGRAMS:
        assert fams[name].type == "histogram", name
    for name in LORAX_GAUGES + GATEWAY_GAUGES:
        assert fams[name].type == "gauge", name
    for name, kind in ADAPTER_SERIES.items():
        assert fams[name].type == kind, name
    text = await (await client.get("/metrics")).text()
    # LoRAX's counters keep LoRAX's exact names: no _total suffix
    assert "\nlorax_request_success 1.0\n" in text and "lorax_request_success_total" not in text


async def test_request_outcomes_are_counted(serve):
    engine = StatsEngine()
    client = await serve(engine)
    for _ in range(2):
        assert (await generate(client)).status == 200
    assert (await generate(client, temperature=-1)).status == 422
    stream = await client.post("/generate_stream", json={"inputs": "hi",
                                                         "parameters": {"max_new_tokens": 2}})
    await stream.read()
    engine.error, engine.error_after = EngineError("Request failed during generation: x"), 1
    stream = await client.post("/generate_stream", json={"inputs": "hi",
                                                         "parameters": {"max_new_tokens": 2}})
    assert b"incomplete_generation" in await stream.read()  # the error event of the stream
    fams = await scrape(client)
    assert value(fams, "lorax_request_count", "lorax_request_count_total") == 5
    assert value(fams, "lorax_request_success", "lorax_request_success_total") == 3
    assert value(fams, "lorax_request_failure", "lorax_request_failure_total",
                 err="validation") == 1
    assert value(fams, "lorax_request_failure", "lorax_request_failure_total",
                 err="incomplete_generation") == 1
    assert value(fams, "lorax_request_duration", "lorax_request_duration_count") == 3
    # per sequence, from the engine's FinishEvents (queue 2 ms, inference 30 ms, 3 tokens)
    assert value(fams, "lorax_request_queue_duration", "lorax_request_queue_duration_sum") == \
        pytest.approx(3 * 0.002)
    assert value(fams, "lorax_request_generated_tokens",
                 "lorax_request_generated_tokens_sum") == 3 + 3 + 2
    assert value(fams, "lorax_request_input_length", "lorax_request_input_length_count") == 4
    assert value(fams, "loraxd_adapter_requests", "loraxd_adapter_requests_total",
                 adapter="fake/base", outcome="success") == 3
    assert value(fams, "loraxd_adapter_requests", "loraxd_adapter_requests_total",
                 adapter="fake/base", outcome="failure") == 1


async def test_adapter_labels_are_bounded(serve):
    client = await serve(StatsEngine(), server={"metrics_adapter_labels": 2})
    for name in ("a", "b", "c", "d", "a"):
        assert (await generate(client, adapter=name)).status == 200
    fams = await scrape(client)
    labels = {s.labels["adapter"]: s.value for s in fams["loraxd_adapter_generated_tokens"].samples
              if s.name.endswith("_total")}
    assert labels == {"a": 6, "b": 3, "<other>": 6}


async def test_steps_and_adapter_moves_are_recorded(serve):
    engine = StatsEngine()
    client = await serve(engine)
    (observe_step,), (observe_move,) = engine.steps.step_observers, \
        engine.adapters.timing_observers
    new = NewSeq(1, [1, 2], [0], SamplingParams())
    prefill = StepPlan(Step(0, [new, new], [7]), join_reason="backpressure")
    observe_step(prefill, StepResult(0, [], 0.01), 0.02)
    observe_step(StepPlan(Step(1, [], [1, 2])), StepResult(1, [], 0.01), 0.004)
    observe_step(StepPlan(Step(2, [], [1])), StepFailed(2, [1], "boom"), 0.5)
    observe_step(StepPlan(Step(3, [new], [])), None, 9.0)  # the workers were lost
    observe_move("fetch", None, 1.5)
    observe_move("load", None, 0.05)
    fams = await scrape(client)

    def count(name, **labels):
        return value(fams, name, name + "_total", **labels)
    assert count("lorax_batch_inference_count", method="prefill") == 2
    assert count("lorax_batch_inference_count", method="decode") == 2
    assert count("lorax_batch_inference_success", method="decode") == 1
    assert count("lorax_batch_inference_failure", method="decode") == 1
    assert count("lorax_batch_inference_failure", method="prefill") == 1
    assert count("lorax_batch_concat", reason="backpressure") == 1
    assert value(fams, "lorax_batch_next_size", "lorax_batch_next_size_sum") == 3
    assert value(fams, "lorax_batch_inference_duration", "lorax_batch_inference_duration_sum",
                 method="prefill") == pytest.approx(0.02)
    assert value(fams, "loraxd_adapter_load_duration_seconds",
                 "loraxd_adapter_load_duration_seconds_sum", stage="fetch") == 1.5
    assert value(fams, "loraxd_adapter_load_duration_seconds",
                 "loraxd_adapter_load_duration_seconds_count", stage="load") == 1


async def test_gauges_follow_the_engine_at_each_scrape(serve):
    engine = StatsEngine([entry("a", running=2), entry("b", running=1, waiting=1),
                          entry("c", status="fetched", waiting=4), entry("idle")])
    client = await serve(engine)
    fams = await scrape(client)
    assert value(fams, "vllm:num_requests_waiting", model_name="fake/base") == 5
    assert value(fams, "vllm:num_requests_running") == value(fams, "lorax_batch_current_size") == 3
    assert value(fams, "vllm:kv_cache_usage_perc") == 0.375
    assert value(fams, "lorax_queue_size") == 5
    assert value(fams, "lorax_batch_current_max_tokens") == 96
    assert value(fams, "loraxd_steps", "loraxd_steps_total") == 1200
    assert value(fams, "loraxd_kv_pages_used") == 12
    assert value(fams, "loraxd_kv_pages_cached") == 20
    assert value(fams, "loraxd_preemptions", "loraxd_preemptions_total") == 2
    assert value(fams, "vllm:num_preemptions", "vllm:num_preemptions_total") == 2
    assert value(fams, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 1000
    assert value(fams, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 640
    assert value(fams, "loraxd_requests_held") == 9
    (info,) = fams["vllm:lora_requests_info"].samples
    assert info.labels == {"max_lora": "4", "running_lora_adapters": "a,b",
                           "waiting_lora_adapters": "b,c"} and info.value > 1.7e9
    engine._stats.update(num_waiting=0, kv_cache_usage=1.0)
    fams = await scrape(client)
    assert value(fams, "vllm:num_requests_waiting") == 0
    assert value(fams, "vllm:gpu_cache_usage_perc") == 1.0


async def test_adapter_tiers(serve):
    engine = StatsEngine([entry("slot"), entry("warm", status="fetched"),
                          entry("cold", status="fetched"), entry("coming", status="fetching"),
                          entry("secret", token="hf_x"), entry("moving", status="loading")],
                         host_cached=["/cache/warm", "/cache/moving"])
    client = await serve(engine)
    fams = await scrape(client)
    tiers = {s.labels["adapter"]: s.labels["tier"] for s in fams["loraxd_adapter_tier"].samples}
    assert tiers == {"slot": "device", "warm": "host", "moving": "host", "cold": "disk"}
    counts = {s.labels["tier"]: s.value for s in fams["loraxd_adapters_by_tier"].samples}
    assert counts == {"device": 2, "host": 2, "disk": 1}  # the private one counts, unnamed
    body = await (await client.get("/metrics", headers={"Accept": "application/json"})).json()
    assert body["adapter_tiers"] == {"slot": "device", "warm": "host", "moving": "host",
                                     "cold": "disk"}


async def test_json_when_asked(serve):
    client = await serve(StatsEngine([entry("a", running=1)]))
    resp = await client.get("/metrics", headers={"Accept": "application/json"})
    assert resp.content_type == "application/json"
    assert await resp.json() == {
        "model_id": "fake/base", "num_requests_waiting": 5, "num_requests_running": 3,
        "kv_cache_usage": 0.375, "num_steps": 1200, "max_lora": 4, "num_adapters_loaded": 1,
        "running_lora_adapters": ["a"], "waiting_lora_adapters": [],
        "adapter_tiers": {"a": "device"}, "num_kv_pages_used": 12,
        "num_kv_pages_cached": 20, "num_preempted": 2, "prefix_queried_tokens": 1000,
        "prefix_hit_tokens": 640, "num_requests_held": 9}


async def test_an_engine_without_read_outs_reads_as_zero(serve):
    fams = await scrape(await serve(FakeEngine()))
    assert value(fams, "vllm:num_requests_waiting") == 0
    assert fams["vllm:lora_requests_info"].samples[0].labels == {
        "max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def test_prometheus_accept_headers_get_text():
    assert wants_json("application/json")
    assert wants_json("application/json; charset=utf-8, */*;q=0.1")
    assert not wants_json("")
    assert not wants_json("*/*")
    assert not wants_json("application/openmetrics-text;version=1.0.0,text/plain;"
                          "version=0.0.4;q=0.5,*/*;q=0.1")
    assert not wants_json("text/plain, application/json")


async def test_label_values_are_escaped(serve):
    odd = 'we"ird\\name\nx'
    client = await serve(StatsEngine([entry(odd, running=1)]), model={"model_id": 'm "q"\\'})
    assert (await generate(client, adapter=odd)).status == 200
    fams = await scrape(client)
    assert fams["vllm:lora_requests_info"].samples[0].labels["running_lora_adapters"] == odd
    assert value(fams, "vllm:num_requests_waiting", model_name='m "q"\\') == 5
    assert value(fams, "lorax_request_success", "lorax_request_success_total") == 1
    assert {s.labels.get("adapter") for s in fams["loraxd_adapter_prompt_tokens"].samples} == {odd}


def test_private_adapters_and_merges_are_not_named():
    merged = MergedAdapters(ids=("x", "y"), weights=(0.5, 0.5))
    merge_entry = SimpleNamespace(key="merge:hub:linear:1.0:total:x*0.5,y*0.5", ref=merged,
                                  status="loaded", num_running=1, num_waiting=0,
                                  path=["/c/x", "/c/y"])
    engine = StatsEngine([entry("secret", running=1, token="hf_x"), entry("open", running=1),
                          merge_entry])
    snap = snapshot(engine, "m")
    assert snap.running_adapters == ["open"] and snap.num_adapters_loaded == 3
    assert snap.tiers == {"open": "device"} and snap.tier_counts["device"] == 3
