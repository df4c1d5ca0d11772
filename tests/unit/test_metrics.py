"""GET /metrics against fake engines: the text format, the values, label escaping, JSON."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from loraxd.engine.request import AdapterRef, MergedAdapters
from loraxd.http.app import make_app
from loraxd.http.metrics import escape_label, render_text, snapshot, wants_json
from tests.unit.test_http_native import FakeEngine, make_config

GATEWAY_NAMES = ["vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info"]


def entry(adapter_id, *, status="loaded", running=0, waiting=0, token=None):
    ref = AdapterRef(adapter_id, "hub", token)
    return SimpleNamespace(key=f"hub:{adapter_id}", ref=ref, status=status, num_running=running,
                           num_waiting=waiting)


class StatsEngine(FakeEngine):
    def __init__(self, entries=(), num_slots=4, **stats):
        super().__init__()
        self._stats = {"num_waiting": 5, "num_running": 3, "kv_cache_usage": 0.375,
                       "num_steps": 1200, **stats}
        self.adapters = SimpleNamespace(entries={e.key: e for e in entries},
                                        slots=[None] * num_slots)

    def stats(self) -> dict:
        return dict(self._stats)


# -- a strict parser for the text format (0.0.4) ----------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf'^({_NAME})(?:\{{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\[\\"n])*",?)*)\}})? '
                     r"(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    """name -> (type, labels, value); every family has HELP and TYPE before one sample."""
    assert text.endswith("\n")
    families, kinds = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter") and name not in kinds
            kinds[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, line
        name, labels, value = m.groups()
        assert name in kinds and name not in families
        families[name] = (kinds[name], {k: _unescape(v) for k, v in
                                        _LABEL.findall(labels or "")}, float(value))
    return families


# -- tests ------------------------------------------------------------------------------------


@pytest.fixture
async def get_metrics():
    clients = []

    async def get(engine, accept=None):
        client = TestClient(TestServer(make_app(engine, make_config())))
        await client.start_server()
        clients.append(client)
        resp = await client.get("/metrics", headers={"Accept": accept} if accept else None)
        assert resp.status == 200
        return resp
    yield get
    for client in clients:
        await client.close()


async def test_values_follow_the_engine(get_metrics):
    engine = StatsEngine([entry("a", running=2), entry("b", running=1, waiting=1),
                          entry("c", status="fetched", waiting=4), entry("idle")])
    resp = await get_metrics(engine)
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse(await resp.text())
    assert set(GATEWAY_NAMES) <= set(m)
    assert m["vllm:num_requests_waiting"] == ("gauge", {"model_name": "fake/base"}, 5.0)
    assert m["vllm:num_requests_running"][2] == m["loraxd_requests_running"][2] == 3.0
    assert m["vllm:gpu_cache_usage_perc"][2] == m["loraxd_kv_cache_usage_ratio"][2] == 0.375
    assert m["vllm:kv_cache_usage_perc"][2] == 0.375
    assert m["loraxd_steps_total"] == ("counter", {}, 1200.0)
    assert m["loraxd_adapters_loaded"][2] == 3 and m["loraxd_adapter_slots"][2] == 4
    kind, labels, value = m["vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "a,b",
                      "waiting_lora_adapters": "b,c"}
    assert value > 1.7e9  # unix time
    assert m["loraxd_lora_requests_info"][1] == labels


async def test_a_scrape_reads_the_engine_now(get_metrics):
    engine = StatsEngine()
    first = parse(await (await get_metrics(engine)).text())
    engine._stats.update(num_waiting=0, kv_cache_usage=1.0)
    second = parse(await (await get_metrics(engine)).text())
    assert first["vllm:num_requests_waiting"][2] == 5
    assert second["vllm:num_requests_waiting"][2] == 0
    assert second["vllm:gpu_cache_usage_perc"][2] == 1.0


async def test_an_engine_without_read_outs_reads_as_zero(get_metrics):
    m = parse(await (await get_metrics(FakeEngine())).text())
    assert m["vllm:num_requests_waiting"][2] == 0 and m["vllm:gpu_cache_usage_perc"][2] == 0
    assert m["vllm:lora_requests_info"][1] == {"max_lora": "0", "running_lora_adapters": "",
                                               "waiting_lora_adapters": ""}


async def test_json_when_asked(get_metrics):
    engine = StatsEngine([entry("a", running=1)])
    resp = await get_metrics(engine, accept="application/json")
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body == {"model_id": "fake/base", "num_requests_waiting": 5,
                    "num_requests_running": 3, "kv_cache_usage": 0.375, "num_steps": 1200,
                    "max_lora": 4, "num_adapters_loaded": 1, "running_lora_adapters": ["a"],
                    "waiting_lora_adapters": []}


def test_prometheus_accept_headers_get_text():
    assert wants_json("application/json")
    assert wants_json("application/json; charset=utf-8, */*;q=0.1")
    assert not wants_json("")
    assert not wants_json("*/*")
    assert not wants_json("application/openmetrics-text;version=1.0.0,text/plain;"
                          "version=0.0.4;q=0.5,*/*;q=0.1")
    assert not wants_json("text/plain, application/json")


def test_label_values_are_escaped():
    odd = 'we"ird\\name\nx'
    assert escape_label(odd) == 'we\\"ird\\\\name\\nx'
    engine = StatsEngine([entry(odd, running=1)])
    text = render_text(snapshot(engine, 'model "q"\\'))
    m = parse(text)
    assert m["vllm:lora_requests_info"][1]["running_lora_adapters"] == odd
    assert m["vllm:num_requests_waiting"][1] == {"model_name": 'model "q"\\'}
    assert len(text.splitlines()) == 3 * len(m)  # no raw newline leaked into a sample


def test_private_adapters_and_merges_are_not_named():
    merged = MergedAdapters(ids=("x", "y"), weights=(0.5, 0.5))
    merge_entry = SimpleNamespace(key="merge:hub:linear:1.0:total:x*0.5,y*0.5", ref=merged,
                                  status="loaded", num_running=1, num_waiting=0)
    engine = StatsEngine([entry("secret", running=1, token="hf_x"), entry("open", running=1),
                          merge_entry])
    snap = snapshot(engine, "m")
    assert snap.running_adapters == ["open"] and snap.num_adapters_loaded == 3


def test_the_official_parser_agrees():
    parser = pytest.importorskip("prometheus_client.parser")
    engine = StatsEngine([entry('q"uote', running=1), entry("b", waiting=2)])
    families = {f.name: f for f in parser.text_string_to_metric_families(
        render_text(snapshot(engine, "m")))}
    assert families["vllm:num_requests_waiting"].samples[0].value == 5
    assert families["loraxd_steps"].type == "counter"
    labels = families["vllm:lora_requests_info"].samples[0].labels
    assert labels["running_lora_adapters"] == 'q"uote' and labels["waiting_lora_adapters"] == "b"
