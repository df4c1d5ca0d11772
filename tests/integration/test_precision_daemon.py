"""Lower precision through the real daemon: /info says what runs, the default model still
answers in int8 + bf16, and on a tiny model with three adapters a concurrent batch of base
and adapter requests gives each request the tokens it gets alone: all of them with int8
weights and float32 activations (whose kernels give a row the same numbers whatever its
batch), the first few with bf16 activations (where kernels picked by the batch's size round
differently, and the tiny random model's near ties then part later tokens)."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from tests.integration import tiny_model
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

LOWER = ("--quantize", "int8-weight-only", "--dtype", "bfloat16")
PROMPTS = ["The best way to learn is", "Paris is a city", "My favourite animal is",
           "The ocean is"]
ADAPTERS = [None, "a", "b", "c"]


def _generate(daemon, prompt, adapter=None, max_new_tokens=12) -> dict:
    params = {"max_new_tokens": max_new_tokens, "details": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    r = requests.post(daemon.url + "/generate", json={"inputs": prompt, "parameters": params},
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_default_model_answers_in_int8_and_bf16(default_model_dir, tmp_path):
    d = Daemon(default_model_dir, tmp_path, *LOWER)
    try:
        d.wait_ready()
        info = requests.get(d.url + "/info", timeout=5).json()
        assert info["quantize"] == "int8-weight-only" and info["model_dtype"] == "bfloat16"
        prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                  "<|im_start|>assistant\n")
        out = _generate(d, prompt, max_new_tokens=20)
        assert "Paris" in out["generated_text"]
    finally:
        d.stop()


@pytest.mark.parametrize("flags, same", [
    (("--quantize", "int8-weight-only"), None),
    (LOWER, 4),
    (("--dtype", "bfloat16"), 4),
], ids=["int8", "int8+bf16", "bf16"])
def test_a_concurrent_adapter_batch_gives_each_request_its_tokens_alone(
        default_model_dir, tmp_path, flags, same):
    root = tiny_model.build(default_model_dir, tmp_path / "tiny")
    d = Daemon(root / "model", tmp_path, *flags, "--adapter-source", "local",
               "--local-adapter-dir", str(root / "adapters"))
    try:
        d.wait_ready()
        info = requests.get(d.url + "/info", timeout=5).json()
        assert info["quantize"] == ("int8-weight-only" if "--quantize" in flags else None)
        tokens = lambda out: [t["id"] for t in out["details"]["tokens"]][:same]  # noqa: E731
        alone = [tokens(_generate(d, p, a)) for p, a in zip(PROMPTS, ADAPTERS)]
        assert len({tuple(t) for t in alone}) == len(alone)  # the adapters change the output
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            batch = list(pool.map(lambda pa: tokens(_generate(d, *pa)), zip(PROMPTS, ADAPTERS)))
        assert batch == alone
    finally:
        d.stop()
