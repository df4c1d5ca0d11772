"""OpenTelemetry traces: the spans each generating route makes (against a fake engine, read
back from the SDK's in-memory exporter), the setting, the exporter's helpers."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from loraxd.config import ConfigError, load
from loraxd.engine.request import EngineError, FinishEvent
from loraxd.http.app import make_app
from loraxd.http.service import FRONTEND_KEY
from loraxd.http.tracing import TracedEngine, sequence_spans
from loraxd.http.tracing_export import RateLimitedWarnings, TraceExport, _resource, traces_url
from tests.integration.daemon import free_port
from tests.integration.otlp_receiver import Receiver
from tests.unit.test_http_native import NUM_PROMPT, PROMPT, make_config
from tests.unit.test_http_openai import CHAT_LIMITS, chat_engine

NATIVE = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
ROUTES = [("/generate", NATIVE), ("/generate_stream", NATIVE), ("/", NATIVE),
          ("/v1/completions", {"model": "fake/base", "prompt": PROMPT, "max_tokens": 3}),
          ("/v1/chat/completions", {"model": "fake/base", "max_tokens": 3,
                                    "messages": [{"role": "user", "content": PROMPT}]}),
          ("/v1/chat/completions", {"model": "fake/base", "max_tokens": 3, "stream": True,
                                    "messages": [{"role": "user", "content": PROMPT}]})]


@pytest.fixture
def exported():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


@pytest.fixture
async def serve(exported):
    clients = []

    async def start(engine=None, **sections):
        engine = engine or chat_engine(delay=0.005)
        config = make_config(scheduler=CHAT_LIMITS, **sections)
        client = TestClient(TestServer(make_app(engine, config, tracer=exported[0])))
        await client.start_server()
        clients.append(client)
        return client, engine
    yield start
    for client in clients:
        await client.close()


def traces(exporter) -> list[list]:
    """The spans of each trace, root first, in the order the roots ended."""
    by_trace: dict[int, list] = {}
    for span in exporter.get_finished_spans():
        by_trace.setdefault(span.context.trace_id, []).append(span)
    return [sorted(spans, key=lambda s: s.parent is not None and not s.parent.is_remote)
            for spans in by_trace.values()]


def phases(spans) -> dict:
    root = spans[0]
    assert all(s.parent.span_id == root.context.span_id for s in spans[1:])
    return {s.name: s for s in spans[1:]}


async def post(client, path, body, **kwargs):
    resp = await client.post(path, json=body, **kwargs)
    text = await resp.text()
    return resp.status, text


@pytest.mark.parametrize("path,body", ROUTES,
                         ids=[f"{p}{' stream' if b.get('stream') else ''}" for p, b in ROUTES])
async def test_a_generating_route_makes_one_trace_with_its_phases(serve, exported, path, body):
    client, engine = await serve()
    assert (await post(client, path, body))[0] == 200
    [spans] = traces(exported[1])
    root, steps = spans[0], phases(spans)
    assert root.name == f"POST {path}" and root.kind is SpanKind.SERVER
    assert root.status.status_code is StatusCode.UNSET
    prompt_tokens = len(engine.requests[0].prompt_ids)
    assert dict(root.attributes) == {
        "http.request.method": "POST", "http.route": path, "http.response.status_code": 200,
        "loraxd.sequences": 1, "loraxd.prompt_tokens": prompt_tokens,
        "loraxd.generated_tokens": 3, "loraxd.finish_reasons": ("length",)}
    queue, prefill, decode = steps["queue"], steps["prefill"], steps["decode"]
    assert sorted(steps) == ["decode", "prefill", "queue"]
    assert root.start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.end_time == decode.start_time <= decode.end_time <= root.end_time
    assert decode.end_time - decode.start_time > 5_000_000  # two tokens after the first, 5 ms each
    assert prefill.attributes["loraxd.prompt_tokens"] == prompt_tokens
    assert decode.attributes["loraxd.generated_tokens"] == 3
    assert decode.attributes["loraxd.finish_reason"] == "length"


async def test_the_adapter_and_every_sequence_are_in_the_trace(serve, exported):
    client, _ = await serve()
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "best_of": 2,
                                             "do_sample": True, "adapter_id": "org/a"}}
    assert (await post(client, "/generate", body))[0] == 200
    [spans] = traces(exported[1])
    root = spans[0]
    assert root.attributes["loraxd.adapter_id"] == "org/a"
    assert root.attributes["loraxd.sequences"] == 2
    assert root.attributes["loraxd.generated_tokens"] == 4
    assert root.attributes["loraxd.prompt_tokens"] == 2 * NUM_PROMPT
    assert sorted((s.name, s.attributes["loraxd.sequence"]) for s in spans[1:]) == [
        ("decode", 0), ("decode", 1), ("prefill", 0), ("prefill", 1), ("queue", 0), ("queue", 1)]


async def test_a_refused_request_is_a_root_span_with_its_error(serve, exported):
    client, _ = await serve()
    status, _ = await post(client, "/generate", {"inputs": PROMPT,
                                                 "parameters": {"max_new_tokens": 10_000}})
    assert status == 422
    [[root]] = traces(exported[1])
    assert root.attributes["http.response.status_code"] == 422
    assert root.attributes["error.type"] == "validation"
    assert root.status.status_code is StatusCode.ERROR
    assert "max_new_tokens" in root.status.description
    assert root.attributes["loraxd.sequences"] == 0


async def test_an_error_mid_stream_marks_the_root(serve, exported):
    engine = chat_engine(error=EngineError("Request failed during generation: boom"),
                         error_after=1)
    client, _ = await serve(engine)
    status, text = await post(client, "/generate_stream", NATIVE)
    assert status == 200 and "boom" in text
    [[root]] = traces(exported[1])  # the sequence did not finish: no phase spans
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["error.type"] == "incomplete_generation"
    assert root.status.status_code is StatusCode.ERROR and "boom" in root.status.description


async def test_a_traceparent_header_joins_the_callers_trace(serve, exported):
    client, _ = await serve()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    assert (await post(client, "/generate", NATIVE, headers=headers))[0] == 200
    [spans] = traces(exported[1])
    assert {s.context.trace_id for s in spans} == {int(trace_id, 16)}
    assert spans[0].parent.span_id == int(parent_id, 16)


async def test_other_routes_make_no_spans(serve, exported):
    client, _ = await serve()
    assert (await client.get("/health")).status == 200
    assert (await client.post("/tokenize", json={"inputs": PROMPT})).status == 200
    assert (await client.get("/info")).status == 200
    assert traces(exported[1]) == []


async def test_without_a_tracer_nothing_is_installed():
    engine = chat_engine()
    traced = make_app(engine, make_config(), tracer=None)
    assert not isinstance(traced[FRONTEND_KEY].engine, TracedEngine)
    assert all(m.__name__ != "trace_request" for m in traced.middlewares)
    code = ("import sys\nimport loraxd.daemon.main, loraxd.daemon.service, loraxd.http.app\n"
            "print([m for m in sys.modules if m.startswith('opentelemetry')])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_phase_times_follow_the_engine_and_stay_in_order(exported):
    tracer, exporter = exported
    finish = FinishEvent("eos_token", "x", 4, 2, None, queue_time_s=0.5, inference_time_s=0.5)
    sequence_spans(tracer, None, finish, 0, arrived=100.0, first_token=100.7, finished=101.0)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    lengths = {name: (s.end_time - s.start_time) / 1e9 for name, s in spans.items()}
    assert lengths == pytest.approx({"queue": 0.5, "prefill": 0.2, "decode": 0.3}, abs=1e-6)
    exporter.clear()
    late = FinishEvent("length", "x", 4, 1, None, queue_time_s=9.0)  # clamped to first token
    sequence_spans(tracer, None, late, 0, arrived=100.0, first_token=None, finished=100.4)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["queue"].end_time == spans["prefill"].start_time == spans["prefill"].end_time
    assert spans["decode"].end_time - spans["decode"].start_time == 0


@pytest.mark.parametrize("endpoint,url", [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
    ("https://otel.example/", "https://otel.example/v1/traces"),
    ("http://h:4318/custom/traces", "http://h:4318/custom/traces")])
def test_a_base_url_gets_the_traces_path(endpoint, url):
    assert traces_url(endpoint) == url


def test_export_failures_are_one_warning_a_minute():
    now = [0.0]
    limiter = RateLimitedWarnings(60.0, clock=lambda: now[0])
    logger = logging.getLogger("test.tracing.export")
    logger.propagate = False
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    logger.addFilter(limiter)
    try:
        for i in range(50):
            logger.error("Failed to export %s batch code: %s", "spans", i)
            now[0] += 1.0
        assert [(r.levelname, r.getMessage()) for r in seen] == [
            ("WARNING", "traces not exported: Failed to export spans batch code: 0")]
        now[0] = 60.0
        logger.error("Failed to export %s batch code: %s", "spans", 60)
        assert seen[-1].getMessage() == ("traces not exported: Failed to export spans batch "
                                         "code: 60 (49 more such message(s) held back since "
                                         "the last)")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limiter)


def test_the_service_name_is_loraxd_unless_the_sdk_is_told(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert _resource().attributes["service.name"] == "loraxd"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lorax-eu-1")
    assert _resource().attributes["service.name"] == "lorax-eu-1"


async def test_close_sends_what_is_queued(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing leaves before close
    receiver = Receiver(free_port()).start()
    try:
        export = TraceExport(f"http://127.0.0.1:{receiver.port}")
        for name in ("a", "b", "c"):
            export.tracer.start_span(name).end()
        await asyncio.sleep(0.2)
        assert receiver.spans == []
        await export.close()
        assert sorted(span.name for _, span in receiver.spans) == ["a", "b", "c"]
        assert {r["service.name"] for r, _ in receiver.spans} == {"loraxd"}
    finally:
        receiver.stop()


async def test_close_waits_no_longer_than_its_bound_for_a_collector_down():
    export = TraceExport(f"http://127.0.0.1:{free_port()}")  # nobody listens there
    export.tracer.start_span("lost").end()
    started = time.monotonic()
    await export.close(timeout_s=0.5)
    assert time.monotonic() - started < 2.0


# -- the setting -------------------------------------------------------------------------------


def run(argv=(), environ=None, config_path="/nonexistent/loraxd.toml"):
    env = {"HOME": "/home/u", **(environ or {})}
    return load(list(argv), env, default_config_path=config_path, euid=1000)[0]


def test_the_endpoint_comes_from_every_source(tmp_path):
    assert run().server.otlp_endpoint is None
    url = "http://collector:4318"
    assert run(["--otlp-endpoint", url]).server.otlp_endpoint == url
    assert run(environ={"OTLP_ENDPOINT": url}).server.otlp_endpoint == url
    assert run(environ={"OTLP_ENDPOINT": "http://a:1", "LORAXD_OTLP_ENDPOINT": url}
               ).server.otlp_endpoint == url
    toml = tmp_path / "loraxd.toml"
    toml.write_text(f'[server]\notlp_endpoint = "{url}"\n')
    assert run(config_path=str(toml)).server.otlp_endpoint == url
    assert run(environ={"OTLP_ENDPOINT": ""}).server.otlp_endpoint is None


@pytest.mark.parametrize("value", ["collector:4318", "grpc://h:4317", "http://", "http://h:x",
                                   "http://h:99999", "not a url"])
def test_an_endpoint_that_is_no_http_url_is_refused(value):
    with pytest.raises(ConfigError, match=r"^command line: --otlp-endpoint = .*: must be an "
                                          r"http:// or https:// URL"):
        run(["--otlp-endpoint", value])


def test_an_sdk_protocol_other_than_http_protobuf_is_refused():
    grpc = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ConfigError, match="^environment: OTEL_EXPORTER_OTLP_PROTOCOL = grpc: "
                                          "loraxd sends traces over OTLP/HTTP"):
        run(["--otlp-endpoint", "http://h:4317"], grpc)
    assert run(environ=grpc).server.otlp_endpoint is None  # no tracing: nothing to refuse
    assert run(["--otlp-endpoint", "http://h:4318"],
               {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}).server.otlp_endpoint


def test_a_bad_endpoint_stops_the_start_with_one_line():
    out = subprocess.run([sys.executable, "-m", "loraxd.daemon.main", "--config", "/dev/null",
                          "--otlp-endpoint", "collector:4318"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 78
    assert out.stderr.startswith("loraxd: command line: --otlp-endpoint = collector:4318: must "
                                 "be an http:// or https:// URL")
    assert out.stderr.count("\n") == 1
