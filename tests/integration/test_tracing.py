"""Traces through the real daemon: an OTLP/HTTP receiver on loopback (aiohttp, decoding
opentelemetry-proto's ExportTraceServiceRequest) gets exactly one trace per generation
request, over the native routes (plain HTTP) and the OpenAI ones (the unmodified openai
client), each with its queue, prefill and decode spans; before the receiver listens, the
requests succeed all the same and the failed exports make one warning.

The model is a tiny random Llama with the real tokenizer.
"""
from __future__ import annotations

import shutil
import time

import openai
import pytest
import requests
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.integration import tiny_model
from tests.integration.daemon import Daemon, free_port
from tests.integration.otlp_receiver import Receiver, attributes

pytestmark = pytest.mark.integration

PROMPT = "The best way to learn is"
NEW = 5  # tokens each request generates (ignore_eos: exactly)
WARNING = "traces not exported"


@pytest.fixture(scope="module")
def root(default_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    root = tiny_model.build(default_model_dir, tmp_path_factory.mktemp("tracing-model"))
    shutil.copy(default_model_dir / "chat_template.jinja", root / "model")  # for chat
    return root


def native(d, path, adapter=None, **params):
    parameters = {"max_new_tokens": NEW, "ignore_eos_token": True, "details": True, **params}
    if adapter:
        parameters["adapter_id"] = adapter
    return requests.post(d.url + path, json={"inputs": PROMPT, "parameters": parameters},
                         timeout=60)


def wait_for(what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.1)
    return False


def test_one_trace_per_request_and_a_collector_down_fails_none(root, tmp_path):
    port = free_port()
    # Short batches and export timeout: the failures come (and end) within the test.
    d = Daemon(root / "model", tmp_path, "--num-threads", "1", "--adapter-source", "local",
               "--local-adapter-dir", str(root / "adapters"), "--max-total-tokens", "1024",
               "--max-input-length", "512", "--max-batch-total-tokens", "8192",
               "--otlp-endpoint", f"http://127.0.0.1:{port}",
               env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})
    receiver = Receiver(port)
    try:
        d.wait_ready()
        # No collector yet: every request still succeeds; the export errors are one warning.
        early = [f"{i + 1:032x}" for i in range(3)]
        for trace_id in early:
            r = requests.post(d.url + "/generate", timeout=60, headers={
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}, json={
                "inputs": PROMPT, "parameters": {"max_new_tokens": NEW}})
            assert r.status_code == 200, r.text
            time.sleep(0.4)  # a batch each
        assert wait_for(lambda: WARNING in d.log()), d.log()
        time.sleep(3.0)  # the last retries give up (2 s export timeout)
        assert d.log().count(WARNING) == 1, d.log()

        receiver.start()
        oc = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0)
        chat = [{"role": "user", "content": PROMPT}]
        base = str(root / "model")  # the base model's id: a `model` naming no adapter
        expected = []  # (route, adapter, status) per request, in order
        r = native(d, "/generate")
        assert r.status_code == 200, r.text
        prompt_tokens = r.json()["details"]["prompt_tokens"]
        expected.append(("/generate", None, 200))
        assert native(d, "/generate", adapter="a").status_code == 200
        expected.append(("/generate", "a", 200))
        r = native(d, "/generate_stream", adapter="b")
        assert r.status_code == 200 and "generated_text" in r.text
        expected.append(("/generate_stream", "b", 200))
        assert native(d, "/generate", max_new_tokens=100_000).status_code == 422
        expected.append(("/generate", None, 422))
        out = oc.completions.create(model="a", prompt=PROMPT, max_tokens=NEW,
                                    extra_body={"ignore_eos_token": True})
        assert out.usage.completion_tokens == NEW
        expected.append(("/v1/completions", "a", 200))
        out = oc.chat.completions.create(model=base, messages=chat, max_tokens=NEW,
                                         extra_body={"ignore_eos_token": True})
        chat_prompt_tokens = out.usage.prompt_tokens
        expected.append(("/v1/chat/completions", None, 200))
        chunks = list(oc.chat.completions.create(model=base, messages=chat, max_tokens=NEW,
                                                 stream=True,
                                                 extra_body={"ignore_eos_token": True}))
        assert chunks
        expected.append(("/v1/chat/completions", None, 200))
        oc.close()
    finally:
        code = d.stop()  # the stop sends what is queued
        if receiver.running:
            receiver.stop()
    assert code == 0, d.log()

    traces = receiver.traces()
    early_ids = {bytes.fromhex(t) for t in early}
    for trace_id in early_ids & traces.keys():  # sent late, after a retry: still one trace
        assert sorted(s.name for s in traces[trace_id]) == [
            "POST /generate", "decode", "prefill", "queue"]
    late = {t: spans for t, spans in traces.items() if t not in early_ids}
    assert len(late) == len(expected), [sorted(s.name for s in v) for v in late.values()]
    roots = sorted(((next(s for s in spans if not s.parent_span_id), spans)
                    for spans in late.values()), key=lambda pair: pair[0].start_time_unix_nano)
    for (top, spans), (route, adapter, status) in zip(roots, expected):
        attrs = attributes(top.attributes)
        assert top.name == f"POST {route}" and top.kind == Span.SPAN_KIND_SERVER
        assert attrs["http.route"] == route and attrs["http.response.status_code"] == status
        assert attrs.get("loraxd.adapter_id") == adapter
        children = {s.name: s for s in spans if s.parent_span_id}
        assert len(children) == len(spans) - 1
        if status != 200:
            assert children == {}
            assert top.status.code == Status.STATUS_CODE_ERROR
            assert attrs["error.type"] == "validation" and "max_new_tokens" in top.status.message
            continue
        assert top.status.code == Status.STATUS_CODE_UNSET
        assert sorted(children) == ["decode", "prefill", "queue"]
        assert all(c.parent_span_id == top.span_id for c in children.values())
        queue, prefill, decode = children["queue"], children["prefill"], children["decode"]
        assert top.start_time_unix_nano <= queue.start_time_unix_nano
        assert queue.end_time_unix_nano == prefill.start_time_unix_nano
        assert prefill.end_time_unix_nano == decode.start_time_unix_nano
        assert decode.end_time_unix_nano <= top.end_time_unix_nano
        assert prefill.end_time_unix_nano > prefill.start_time_unix_nano  # a real step
        assert attrs["loraxd.generated_tokens"] == NEW
        assert attrs["loraxd.finish_reasons"] == ["length"] and attrs["loraxd.sequences"] == 1
        assert attributes(decode.attributes)["loraxd.generated_tokens"] == NEW
        if route.startswith("/generate"):
            assert attrs["loraxd.prompt_tokens"] == prompt_tokens
        if route == "/v1/chat/completions":
            assert attrs["loraxd.prompt_tokens"] == chat_prompt_tokens
    resources = {tuple(sorted(r.items())) for r, _ in receiver.spans}
    assert all(dict(r)["service.name"] == "loraxd" for r in resources)
