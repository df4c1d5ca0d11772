"""Adapters are untrusted input, through the real daemon: a catastrophic regex, a weights file
linked out of the adapter directories, a rank or a size over the limits each answer 424 with
the reason, while other streams go on and /health stays 200."""
from __future__ import annotations

import json
import time

import pytest
import requests

from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

MAX_RANK = 16
MAX_BYTES = 100_000


def write_adapter(path, shapes, *, r=2, layers=(0,), **config):
    """A PEFT LoRA adapter on q_proj of `layers`, written by hand (random, small)."""
    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    in_f, out_f = shapes["q_proj"]
    tensors = {}
    for layer in layers:
        name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, in_f) * 0.01
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, r) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"],
              "layers_to_transform": list(layers), **config}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def adapters(default_model_dir, tmp_path_factory):
    model = json.loads((default_model_dir / "config.json").read_text())
    hidden = model["hidden_size"]
    shapes = {"q_proj": (hidden, hidden)}
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "ok", shapes)
    write_adapter(root / "regex", shapes, target_modules="(.|.)*Z")
    write_adapter(root / "high-rank", shapes, r=2 * MAX_RANK)
    write_adapter(root / "big", shapes, r=8, layers=range(5))
    assert (root / "big" / "adapter_model.safetensors").stat().st_size > MAX_BYTES
    linked = write_adapter(root / "linked", shapes)
    outside = tmp_path_factory.mktemp("outside") / "adapter_model.safetensors"
    (linked / "adapter_model.safetensors").rename(outside)
    (linked / "adapter_model.safetensors").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def daemon(default_model_dir, adapters, tmp_path_factory):
    d = Daemon(default_model_dir, tmp_path_factory.mktemp("daemon"),
               "--local-adapter-dir", str(adapters), "--adapter-source", "local",
               "--max-lora-rank", str(MAX_RANK), "--max-adapter-bytes", str(MAX_BYTES))
    try:
        yield d.wait_ready()
    finally:
        assert d.stop() == 0, d.log()  # SIGTERM stops it, whatever the adapters did


def generate(daemon, adapter_id=None, timeout=60):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "adapter_id": adapter_id}}
    return requests.post(daemon.url + "/generate", json=body, timeout=timeout)


def test_catastrophic_regex_beside_a_stream(daemon):
    """`(.|.)*Z` would backtrack for ever in Python's re, holding the worker's GIL."""
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 60,
                                                         "ignore_eos_token": True}}
    with requests.post(daemon.url + "/generate_stream", json=body, stream=True,
                       timeout=120) as stream:
        events = (line for line in stream.iter_lines() if line)
        next(events)  # the stream runs
        started = time.monotonic()
        r = generate(daemon, "regex", timeout=30)
        assert r.status_code == 424, r.text
        assert "(.|.)*Z" in r.json()["error"]
        assert time.monotonic() - started < 20  # generous: the CPU is shared
        last = json.loads(list(events)[-1].removeprefix(b"data:"))
    assert last["generated_text"] is not None, last
    assert requests.get(daemon.url + "/health", timeout=5).status_code == 200
    assert generate(daemon, "ok").status_code == 200


def test_weights_linked_outside_the_adapter_dirs(daemon):
    r = generate(daemon, "linked")
    assert r.status_code == 424, r.text
    assert "adapter_model.safetensors resolves to a file outside" in r.json()["error"]


def test_rank_over_max_lora_rank(daemon):
    r = generate(daemon, "high-rank")
    assert r.status_code == 424, r.text
    assert f"r={2 * MAX_RANK} is above this server's max_lora_rank ({MAX_RANK})" in \
        r.json()["error"]


def test_size_over_max_adapter_bytes(daemon):
    r = generate(daemon, "big")
    assert r.status_code == 424, r.text
    assert "more than max_adapter_bytes" in r.json()["error"]
    assert generate(daemon).status_code == 200
