"""The KV cache reused and rationed, through the real daemon: a shared system prompt taken
from the prefix cache, a long prompt prefilled in slices while streams decode, sequences
preempted when the pages run out. Each gives the tokens of a daemon that does none of it
(no prefix cache, no slices, a cache big enough for everything), and the metrics say that
it happened.

The model is a tiny random Llama with the real tokenizer and three adapters.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import tiny_model
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

SYSTEM = " ".join(f"Rule {i}: answer briefly and name the source of each fact." for i in range(60))
COMMON = ("--num-threads", "1", "--adapter-source", "local", "--max-input-length", "2000",
          "--max-total-tokens", "2048", "--max-batch-prefill-tokens", "2048")


@pytest.fixture(scope="module")
def root(default_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_model.build(default_model_dir, tmp_path_factory.mktemp("kv-reuse-model"))


def start(root, tmp, *extra) -> Daemon:
    return Daemon(root / "model", tmp, *COMMON, "--local-adapter-dir",
                  str(root / "adapters"), *extra).wait_ready()


@pytest.fixture(scope="module")
def plain(root, tmp_path_factory):
    """The reference: every prompt computed whole, in one step, with room for all."""
    d = start(root, tmp_path_factory.mktemp("plain"), "--no-prefix-caching",
              "--prefill-chunk-tokens", "0", "--max-batch-total-tokens", "32768")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def rationed(root, tmp_path_factory):
    """Prefix cache and 64-token slices on (the defaults), and a KV cache of 2560 tokens."""
    d = start(root, tmp_path_factory.mktemp("rationed"), "--max-batch-total-tokens", "2560")
    yield d
    d.stop()


def generate(d, prompt, max_new=24, adapter=None) -> list[int]:
    params = {"max_new_tokens": max_new, "ignore_eos_token": True, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    r = requests.post(d.url + "/generate", json={"inputs": prompt, "parameters": params},
                      timeout=300)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def together(d, jobs) -> list[list[int]]:
    """Run (prompt, max_new, adapter) jobs at once."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: generate(d, *job), jobs))


def metric(d, name) -> float:
    text = requests.get(d.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_a_shared_system_prompt_is_computed_once_per_adapter(plain, rationed):
    questions = ["What is a cat?", "Where is Rome?", "Why is the sky blue?"]
    jobs = [(f"{SYSTEM}\nQ: {q}\nA:", 24, adapter)
            for adapter in (None, "a", "b") for q in questions]
    hits = metric(rationed, "vllm:prefix_cache_hits_total")
    first = generate(rationed, jobs[0][0])  # the system prompt's pages enter the cache
    got = [generate(rationed, *job) for job in jobs]
    assert got[0] == first
    assert got == [generate(plain, *job) for job in jobs]
    # every request after the first found the system prompt's full pages (some 600 tokens);
    # the adapters' first requests found none of the base model's
    found = metric(rationed, "vllm:prefix_cache_hits_total") - hits
    assert found >= 6 * 512, found


def test_a_long_prompt_is_sliced_between_the_tokens_of_running_streams(plain, rationed):
    long_prompt = " ".join(f"item {i} is {i * 7 % 13}" for i in range(250))  # ~1,500 tokens
    jobs = [(f"Story {i}: once upon a time", 120, None) for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(generate, rationed, *job) for job in jobs]
        long = pool.submit(generate, rationed, long_prompt, 8).result()
        streamed = [f.result() for f in streams]
    assert long == generate(plain, long_prompt, 8)
    assert streamed == together(plain, jobs)


def test_sequences_preempted_when_pages_run_out_resume_with_the_same_tokens(plain, rationed):
    preempted = metric(rationed, "loraxd_preemptions_total")
    jobs = [(f"Chapter {i}. The {i}th day began", 400, ("a", "b", None)[i % 3])
            for i in range(8)]  # 8 x ~410 tokens: more than the 2560 of the cache
    assert together(rationed, jobs) == together(plain, jobs)
    assert metric(rationed, "loraxd_preemptions_total") > preempted
    assert metric(rationed, "loraxd_kv_pages_used") == 0
