"""Structured output, tools, the watermark and adapters' own chat templates through the real
daemon (a tiny random model with the default model's tokenizer), driven by plain HTTP, the
unmodified openai client and the unmodified lorax-client."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import shutil
import signal

import jsonschema
import openai
import pytest
import requests

from tests.clients import needs_lorax_client, run_lorax_client
from tests.integration import tiny_model
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

NUM = 8
PROMPTS = [f"Request {i}: tell me about the number {i}." for i in range(NUM)]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["zip"], "additionalProperties": False},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 2, "items": {
        "type": "string", "maxLength": 5}}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                      "y": {"type": "null"}},
     "required": ["x", "y"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
               {"type": "string", "maxLength": 4}]},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
OWN_TEMPLATE = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
DELTA = 10.0  # --watermark-delta: strong enough to steer a random model's greedy choice


@pytest.fixture(scope="module")
def root(default_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    adapters = [(f"a{i}", 10 + i, 4) for i in range(NUM)]
    root = tiny_model.build(default_model_dir, tmp_path_factory.mktemp("structured"), adapters)
    shutil.copy(default_model_dir / "chat_template.jinja", root / "model")
    (root / "adapters" / "a0" / "chat_template.jinja").write_text(OWN_TEMPLATE)
    return root


@pytest.fixture(scope="module")
def daemon(root, tmp_path_factory):
    d = Daemon(root / "model", tmp_path_factory.mktemp("daemon"), "--adapter-source", "local",
               "--local-adapter-dir", str(root / "adapters"), "--max-active-adapters", str(NUM),
               "--max-total-tokens", "1024", "--max-input-length", "768",
               "--max-concurrent-requests", "64", "--watermark-delta", str(DELTA),
               "--step-timeout-floor-s", "5", "--heartbeat-timeout-s", "5",
               "--restart-backoff-s", "0.1")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def generate(d: Daemon, prompt: str, **params) -> dict:
    params = {"max_new_tokens": 24, "details": True, **params}
    r = requests.post(d.url + "/generate", json={"inputs": prompt, "parameters": params},
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def plain(i: int) -> dict:
    return {"adapter_id": f"a{i}", "ignore_eos_token": True}


def constrained(i: int) -> dict:
    return {"adapter_id": f"a{(i + 3) % NUM}", "max_new_tokens": 120,
            "response_format": {"type": "json_schema", "schema": SCHEMAS[i]}}


def test_constrained_beside_unconstrained_with_different_adapters(daemon):
    jobs = [(PROMPTS[i], plain(i)) for i in range(NUM)]
    with cf.ThreadPoolExecutor(2 * NUM) as pool:
        alone = list(pool.map(lambda job: generate(daemon, job[0], **job[1]), jobs))
        jobs += [(PROMPTS[i], constrained(i)) for i in range(NUM)]
        mixed = list(pool.map(lambda job: generate(daemon, job[0], **job[1]), jobs))
    for i in range(NUM):
        assert mixed[i]["generated_text"] == alone[i]["generated_text"], i
        out = mixed[NUM + i]
        assert out["details"]["finish_reason"] == "eos_token", out
        jsonschema.validate(json.loads(out["generated_text"]), SCHEMAS[i])


def test_an_unsupported_schema_is_a_422_that_names_it(daemon):
    r = requests.post(daemon.url + "/generate", json={"inputs": "x", "parameters": {
        "response_format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}, timeout=30)
    assert r.status_code == 422 and '"not"' in r.json()["error"]


def test_a_constrained_stream_survives_kill_9_of_its_worker(daemon):
    params = {"max_new_tokens": 120, "response_format": {"type": "json_schema",
                                                          "schema": SCHEMAS[0]}}
    whole = generate(daemon, PROMPTS[0], **params)["generated_text"]
    (pid,) = daemon.worker_pids()
    with requests.post(daemon.url + "/generate_stream", json={"inputs": PROMPTS[0],
                       "parameters": params}, stream=True, timeout=300) as r:
        lines = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:"))
        events = [next(lines), next(lines)]
        os.kill(pid, signal.SIGKILL)
        events += list(lines)
    assert events[-1]["generated_text"] == whole  # replayed into the same grammar state
    jsonschema.validate(json.loads(whole), SCHEMAS[0])


def test_watermark_makes_the_text_green(daemon, root):
    from loraxd.worker.layers.watermark import Watermark
    mark = Watermark(0.5, DELTA)
    ids = requests.post(daemon.url + "/tokenize", json={"inputs": PROMPTS[1]},
                        timeout=30).json()
    last = ids[-1]["id"]
    fractions = {}
    for watermark in (False, True):
        out = generate(daemon, PROMPTS[1], max_new_tokens=40, ignore_eos_token=True,
                       watermark=watermark)
        tokens = [last] + [t["id"] for t in out["details"]["tokens"]]
        fractions[watermark] = mark.green_fraction(tokens, 49152)
    assert fractions[True] > 0.9 and fractions[False] < 0.75, fractions


async def test_openai_client_json_schema_and_tools(daemon):
    async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="x",
                                  max_retries=0) as oc:
        resp = await oc.chat.completions.create(
            model="", messages=[{"role": "user", "content": "JSON please"}], max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                    "schema": SCHEMAS[0]}})
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMAS[0])
        for model in ("", "a1"):
            resp = await oc.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER], tool_choice="required", max_tokens=120)
            call = resp.choices[0].message.tool_calls[0]
            assert resp.choices[0].finish_reason == "tool_calls"
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments),
                                WEATHER["function"]["parameters"])
        stream = await oc.chat.completions.create(
            model="a2", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=120, stream=True)
        chunks = [c async for c in stream]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads("".join(tc.function.arguments for tc in calls)),
                            WEATHER["function"]["parameters"])
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_an_adapter_with_its_own_template_renders_with_it(daemon):
    messages = [{"role": "user", "content": "hello there"}]
    own = requests.post(daemon.url + "/tokenize", json={
        "inputs": "[hello there]", "add_special_tokens": False}, timeout=30).json()
    async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="x",
                                  max_retries=0) as oc:
        with_own = await oc.chat.completions.create(model="a0", messages=messages, max_tokens=1)
        with_base = await oc.chat.completions.create(model="a1", messages=messages,
                                                     max_tokens=1)
    assert with_own.usage.prompt_tokens == len(own)
    assert with_base.usage.prompt_tokens > len(own) + 5  # the base template's system prompt


@needs_lorax_client
def test_lorax_client_response_format_and_watermark(daemon):
    summary = asyncio.run(run_lorax_client("structured", daemon.url, json.dumps(SCHEMAS[0])))
    jsonschema.validate(json.loads(summary["json"]["generated_text"]), SCHEMAS[0])
    assert summary["watermarked"]["details"]["generated_tokens"] == 8
