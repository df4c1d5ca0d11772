"""The real daemon on the default model: HTTP in, tokens out, through the ZeroMQ worker."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import pytest
import requests

from tests.clients import needs_lorax_client, run_lorax_client
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(question: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Say hello in Spanish.",
             "What is the boiling point of water?", "List two planets."]


@pytest.fixture(scope="module")
def daemon(default_model_dir, tmp_path_factory):
    d = Daemon(default_model_dir, tmp_path_factory.mktemp("daemon"))
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def generate(daemon, inputs, **params):
    r = requests.post(daemon.url + "/generate", json={"inputs": inputs, "parameters": params},
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_info(daemon):
    assert requests.get(daemon.url + "/health", timeout=30).status_code == 200
    info = requests.get(daemon.url + "/info", timeout=5).json()
    assert info["model_device_type"] == "cpu" and info["model_dtype"] == "float32"
    assert info["quantize"] is None  # the exact default
    assert info["max_input_length"] == 1024


def test_answers_the_capital_of_france(daemon):
    out = generate(daemon, chat(QUESTIONS[0]), max_new_tokens=20, details=True)
    assert out["generated_text"] == "The capital of France is Paris."
    assert out["details"]["finish_reason"] == "eos_token"


def test_concurrent_requests_match_transformers_greedy(daemon, default_model_dir):
    """8 requests sharing the batch give exactly transformers' greedy tokens, each alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    n_new = 24
    expected = []
    with torch.inference_mode():
        for q in QUESTIONS:
            ids = tok(chat(q), return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=n_new, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=2)
            expected.append(out[0, ids.shape[1]:].tolist())
    del model
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: generate(daemon, chat(q), max_new_tokens=n_new,
                                               details=True), QUESTIONS))
    for q, want, out in zip(QUESTIONS, expected, got):
        ids = [t["id"] for t in out["details"]["tokens"]]
        assert ids == want[:len(ids)], q
        assert len(ids) == len(want) or out["details"]["finish_reason"] == "eos_token"


def test_stream_and_generate_agree(daemon):
    prompt = chat(QUESTIONS[3])
    whole = generate(daemon, prompt, max_new_tokens=16)["generated_text"]
    r = requests.post(daemon.url + "/generate_stream",
                      json={"inputs": prompt, "parameters": {"max_new_tokens": 16}},
                      stream=True, timeout=60)
    events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == whole
    assert events[-1]["generated_text"] == whole
    assert all(e["generated_text"] is None for e in events[:-1])


@needs_lorax_client
async def test_lorax_client(daemon):
    """The unmodified lorax-client, run in its own virtual environment."""
    out = await run_lorax_client("chat", daemon.url, chat(QUESTIONS[0]))
    assert out["response"]["generated_text"] == "The capital of France is Paris."
    streamed = "".join(r["token"]["text"] for r in out["stream"] if not r["token"]["special"])
    assert streamed == out["response"]["generated_text"]


def test_seeded_sampling_is_reproducible(daemon):
    a = generate(daemon, "Once upon a time", max_new_tokens=12, do_sample=True,
                 temperature=0.9, top_p=0.9, seed=42, details=True)
    b = generate(daemon, "Once upon a time", max_new_tokens=12, do_sample=True,
                 temperature=0.9, top_p=0.9, seed=42)
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 42


def test_bad_input_is_refused_and_daemon_survives(daemon):
    r = requests.post(daemon.url + "/generate", data=b"{not json", timeout=5,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = requests.post(daemon.url + "/generate",
                      json={"inputs": "hi", "parameters": {"max_new_tokens": 0}}, timeout=5)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = requests.post(daemon.url + "/generate", json={"inputs": "x " * 3000}, timeout=30)
    assert r.status_code == 422
    assert generate(daemon, "Hello", max_new_tokens=2)["generated_text"]


def test_client_disconnect_frees_the_request(daemon):
    with requests.post(daemon.url + "/generate_stream", stream=True, timeout=60,
                       json={"inputs": "Count to a thousand:",
                             "parameters": {"max_new_tokens": 1000,
                                            "ignore_eos_token": True}}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = requests.get(daemon.url + "/info", timeout=5)
        assert metrics.status_code == 200
        # the next short request finishes quickly: the long one is gone from the batch
        t0 = time.monotonic()
        generate(daemon, "Hi", max_new_tokens=2)
        if time.monotonic() - t0 < 2:
            return
    pytest.fail("the abandoned request kept running")


def test_a_dead_worker_is_restarted(daemon):
    pids = daemon.worker_pids()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = daemon.worker_pids()
        if new and new != pids:
            try:
                if requests.get(daemon.url + "/health", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                pass
        time.sleep(0.5)
    else:
        pytest.fail(f"worker not restarted:\n{daemon.log()}")
    assert generate(daemon, chat(QUESTIONS[0]), max_new_tokens=20)["generated_text"] == \
        "The capital of France is Paris."


def test_loraxctl_status_reads_the_live_daemon(daemon, default_model_dir):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                          str(daemon.runtime_dir / "control.sock"), "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["model_id"] == str(default_model_dir)
    assert status["pid"] == daemon.proc.pid
    assert status["worker_pids"] == daemon.worker_pids() and status["serving"]
    assert status["num_steps"] > 0 and 0.0 <= status["kv_cache_usage"] <= 1.0


def test_metrics_carry_the_gateway_gauges(daemon):
    r = requests.get(daemon.url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert any(line.startswith("vllm:num_requests_waiting{") for line in lines)
    assert any(line.startswith("vllm:lora_requests_info{max_lora=") for line in lines)
    assert requests.get(daemon.url + "/metrics", timeout=5,
                        headers={"Accept": "application/json"}).json()["num_steps"] > 0


def test_no_pages_or_slots_leak_under_churn(daemon):
    """48 concurrent streams, half abandoned after their first token, some invalid: all
    answered, and afterwards nothing is running, waiting or holding KV pages."""
    import asyncio
    import random

    import aiohttp

    async def one(session, i, rng):
        params = {"max_new_tokens": rng.randint(1, 16), "ignore_eos_token": True}
        if i % 2:
            params["max_new_tokens"] = 900  # only cancellation frees it in time
        if i % 7 == 0:
            params["temperature"] = -1  # invalid: an error event, nothing queued
        async with session.post(daemon.url + "/generate_stream",
                                json={"inputs": f"Story {i}:", "parameters": params}) as r:
            async for line in r.content:
                if line.startswith(b"data:") and i % 2:
                    return "abandoned"  # leaves with the stream still open
            return r.status

    async def run():
        rng = random.Random(7)
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, i, rng) for i in range(48)))

    results = asyncio.run(run())
    assert all(r in (200, "abandoned") for r in results), results
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = requests.get(daemon.url + "/metrics", headers={"Accept": "application/json"},
                             timeout=5).json()
        if (stats["num_requests_running"], stats["num_requests_waiting"],
                stats["kv_cache_usage"]) == (0, 0, 0.0):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"state left behind: {stats}")
    assert generate(daemon, chat(QUESTIONS[0]), max_new_tokens=20)["generated_text"] == \
        "The capital of France is Paris."
