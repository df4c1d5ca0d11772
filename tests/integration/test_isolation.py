"""The real daemon: a request that breaks the numbers fails alone, with a clear error, while
a long stream from another client in the same batch goes on unchanged; nothing it leaves
behind (KV pages, batch slots) hurts the requests after it."""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import pytest
import requests

from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

STORY = "Once upon a time, in a small village by the sea,"
QUESTION = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
LONG = {"max_new_tokens": 120, "ignore_eos_token": True}
SHORT = {"max_new_tokens": 12}
HIDDEN, LAYERS = 576, 30  # the default model's


def write_adapter(root, name: str, value: float) -> None:
    """A rank-4 PEFT adapter on every o_proj whose lora_B holds `value` in layer 0."""
    import torch
    from safetensors.torch import save_file
    out = root / name
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["o_proj"], "lora_dropout": 0.0, "bias": "none"}))
    tensors = {}
    for layer in range(LAYERS):
        key = f"base_model.model.model.layers.{layer}.self_attn.o_proj"
        tensors[f"{key}.lora_A.weight"] = torch.full((4, HIDDEN), 0.01)
        tensors[f"{key}.lora_B.weight"] = torch.full((HIDDEN, 4), value if layer == 0 else 0.0)
    save_file(tensors, str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def daemon(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root, "nan", float("nan"))
    write_adapter(root, "huge", 3e38)  # finite weights whose activations overflow
    d = Daemon(default_model_dir, tmp_path_factory.mktemp("isolation"),
               "--local-adapter-dir", str(root), "--adapter-source", "local",
               "--preloaded-adapter-id", "nan", "--preloaded-adapter-id", "huge")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def post(daemon, path, body, **kw):
    return requests.post(daemon.url + path, json=body, timeout=300, **kw)


def generate(daemon, inputs, params) -> tuple[int, dict]:
    r = post(daemon, "/generate", {"inputs": inputs, "parameters": params})
    return r.status_code, r.json()


def stream_text(daemon, inputs, params, started: threading.Event | None = None) -> str:
    """The native stream's text, checked against its last event's generated_text."""
    texts, last = [], None
    with post(daemon, "/generate_stream", {"inputs": inputs, "parameters": params},
              stream=True) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data:"):
                continue
            last = json.loads(line[len(b"data:"):])
            assert "error" not in last, last
            texts.append(last["token"]["text"])
            if started is not None and len(texts) == 3:
                started.set()
    assert "".join(texts) == last["generated_text"]
    return last["generated_text"]


def stream_events(daemon, inputs, params) -> list[dict]:
    with post(daemon, "/generate_stream", {"inputs": inputs, "parameters": params},
              stream=True) as r:
        return [json.loads(line[len(b"data:"):]) for line in r.iter_lines()
                if line.startswith(b"data:")]


def poison(daemon) -> dict:
    """Each poisoned request, while the healthy stream runs: what each answered."""
    local = {"adapter_source": "local", **SHORT}
    return {
        # the door's rules refuse these before any step (they used to fail the whole step)
        "tiny_temperature": generate(daemon, STORY, {"do_sample": True, "temperature": 1e-50,
                                                     **SHORT}),
        "tiny_penalty": generate(daemon, STORY, {"do_sample": True,
                                                 "repetition_penalty": 1e-50, **SHORT}),
        # these reach the worker: their rows of the batch's logits are NaN
        "nan": generate(daemon, STORY, {"adapter_id": "nan", **local}),
        "nan_stream": stream_events(daemon, STORY, {"adapter_id": "nan", **local}),
        "huge": generate(daemon, QUESTION, {"adapter_id": "huge", "do_sample": True, **local}),
        "openai": (lambda r: (r.status_code, r.json()))(post(daemon, "/v1/completions", {
            "model": "nan", "prompt": STORY, "max_tokens": 12, "adapter_source": "local"})),
        # on the page the last one had (freed pages go out again first): a short prompt, so
        # its masked decode reads cover what the poisoned prompt wrote there
        "after": generate(daemon, "Hi", SHORT),
    }


def test_poisoned_requests_fail_alone(daemon):
    alone = stream_text(daemon, STORY, LONG)
    before = generate(daemon, "Hi", SHORT)
    assert before[0] == 200
    with cf.ThreadPoolExecutor(1) as pool:
        started = threading.Event()
        healthy = pool.submit(stream_text, daemon, STORY, LONG, started)
        assert started.wait(120), "the healthy stream did not start"
        answers = poison(daemon)
        assert not healthy.done(), "the poisoned requests never shared a batch with the stream"
        assert healthy.result(timeout=300) == alone

    for name in ("tiny_temperature", "tiny_penalty"):
        status, body = answers[name]
        assert status == 422 and body["error_type"] == "validation", (name, body)
    nan = {"error": "Request failed during generation: the model's logits are not finite "
                    "(NaN or inf)", "error_type": "incomplete_generation"}
    for name in ("nan", "huge"):
        assert answers[name] == (500, nan), name
    assert answers["nan_stream"] == [nan]
    status, body = answers["openai"]
    assert status == 500 and body["error"]["message"] == nan["error"]
    assert answers["after"] == before

    assert requests.get(daemon.url + "/health", timeout=30).status_code == 200
    metrics = requests.get(daemon.url + "/metrics", headers={"Accept": "application/json"},
                           timeout=10).json()
    assert metrics["kv_cache_usage"] == 0 and metrics["num_requests_running"] == 0
