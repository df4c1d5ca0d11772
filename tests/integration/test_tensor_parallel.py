"""`--num-shard 2` through the real daemon on CPU (gloo): the same greedy tokens as
`--num-shard 1` for the base model and a concurrent batch of three adapters, each rank
holding about half of the weights (in /info and `loraxctl workers`), a rank killed
mid-stream replaced with its whole group and the stream resumed on it, token for token, and
a model whose heads do not split refused.

The model is a tiny random Llama (hidden 64, 4 heads, 2 KV heads, untied LM head) with the
default model's tokenizer, so that its vocabulary (49152 rows) is most of its weights, as
in real models, and the vocab-parallel embedding and LM head show in the memory figures.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.integration import tiny_model
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

PROMPTS = ["The best way to learn is", "Paris is a city", "My favourite animal is",
           "The ocean is"]
ADAPTERS = [None, "a", "b", "c"]  # one request each, all at once
NEW_TOKENS = 12
LONG = 300  # tokens of the stream whose rank is killed


@pytest.fixture(scope="module")
def model_dir(default_model_dir, tmp_path_factory):
    """The tiny model and three PEFT adapters (ranks 8, 4, 2, on every linear)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return tiny_model.build(default_model_dir, tmp_path_factory.mktemp("tp-model"))


def _start(root, tmp, num_shard: int) -> Daemon:
    return Daemon(root / "model", tmp, "--num-shard", str(num_shard), "--num-threads", "1",
                  "--adapter-source", "local", "--local-adapter-dir", str(root / "adapters"),
                  "--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens", "2048",
                  "--max-total-tokens", "1024", "--max-input-length", "512").wait_ready()


def _generate(daemon, prompt, adapter=None, max_new_tokens=NEW_TOKENS) -> list[int]:
    params = {"max_new_tokens": max_new_tokens, "details": True, "ignore_eos_token": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    r = requests.post(daemon.url + "/generate", json={"inputs": prompt, "parameters": params},
                      timeout=300)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def _batch(daemon) -> dict:
    with cf.ThreadPoolExecutor(len(ADAPTERS)) as pool:
        futures = {a: pool.submit(_generate, daemon, p, a) for a, p in zip(ADAPTERS, PROMPTS)}
        return {a: f.result() for a, f in futures.items()}


def _workers(daemon) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                          str(daemon.runtime_dir / "control.sock"), "workers", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["workers"]


@pytest.fixture(scope="module")
def one_shard(model_dir, tmp_path_factory):
    d = _start(model_dir, tmp_path_factory.mktemp("shard1"), 1)
    try:
        alone = _generate(d, PROMPTS[1], "a")
        return {"batch": _batch(d), "alone": alone, "workers": _workers(d),
                "long": _generate(d, PROMPTS[0], max_new_tokens=LONG),
                "info": requests.get(d.url + "/info", timeout=10).json()}
    finally:
        d.stop()


@pytest.fixture(scope="module")
def two_shards(model_dir, tmp_path_factory):
    d = _start(model_dir, tmp_path_factory.mktemp("shard2"), 2)
    try:
        yield d
    finally:
        d.stop()


def test_two_shards_generate_the_tokens_of_one(one_shard, two_shards):
    got = _batch(two_shards)
    assert got == one_shard["batch"]
    assert one_shard["batch"]["a"] != _generate(two_shards, PROMPTS[1])  # adapters matter
    assert _generate(two_shards, PROMPTS[1], "a") == one_shard["alone"]


def test_each_rank_holds_half_the_weights(one_shard, two_shards):
    info = requests.get(two_shards.url + "/info", timeout=10).json()
    assert info["sharded"] and info["num_shard"] == 2
    ranks, (whole,) = info["ranks"], one_shard["info"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["device"] == "cpu" for r in ranks)
    workers = _workers(two_shards)
    assert [w["weight_bytes"] for w in workers] == [r["weight_bytes"] for r in ranks]
    print(f"\nweight bytes: 1 shard {whole['weight_bytes']}, 2 shards "
          f"{[r['weight_bytes'] for r in ranks]}; KV cache {whole['kv_cache_bytes']} -> "
          f"{[r['kv_cache_bytes'] for r in ranks]}; RSS {one_shard['workers'][0]['rss_bytes']}"
          f" -> {[w['rss_bytes'] for w in workers]}")
    for rank in ranks:
        assert 0.45 <= rank["weight_bytes"] / whole["weight_bytes"] <= 0.55
        assert rank["kv_cache_bytes"] * 2 == whole["kv_cache_bytes"]


def _rank_pids(daemon) -> dict[int, int]:
    pids = {}
    for pid in daemon.worker_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        pids[int(argv[argv.index(b"--rank") + 1])] = pid
    return pids


def test_a_rank_killed_mid_stream_replaces_the_group(one_shard, two_shards):
    """The stream goes on: the new group prefills prompt + tokens sent and carries on, and
    the client gets the uninterrupted run's tokens, each once."""
    old = _rank_pids(two_shards)
    assert sorted(old) == [0, 1]
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": LONG,
                                                 "ignore_eos_token": True}}
    with requests.post(two_shards.url + "/generate_stream", json=body, stream=True,
                       timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith(b"data:"))
        events = [json.loads(next(lines)[5:])]
        os.kill(old[1], signal.SIGKILL)
        events += [json.loads(line[5:]) for line in lines]
    assert "error" not in events[-1], events[-1]
    assert [e["token"]["id"] for e in events] == one_shard["long"]
    assert events[-1]["generated_text"] is not None
    assert "1 running request(s) will resume" in two_shards.log()  # it was cut mid-stream
    new = _rank_pids(two_shards)
    assert sorted(new) == [0, 1] and not set(new.values()) & set(old.values())
    assert requests.get(two_shards.url + "/health", timeout=30).status_code == 200
    assert _batch(two_shards) == one_shard["batch"]  # adapters load again on the new group


def test_heads_that_do_not_split_are_refused(default_model_dir, tmp_path):
    """The default model has 9 attention heads and 3 KV heads: 2 shards cannot hold them."""
    daemon = Daemon(default_model_dir, tmp_path, "--num-shard", "2", "--num-threads", "1")
    try:
        assert daemon.proc.wait(180) == 78, daemon.log()
    finally:
        daemon.stop()
    errors = [line for line in daemon.log().splitlines() if "cannot start" in line]
    assert len(errors) == 1 and "9 attention heads do not split over 2 ranks" in errors[0], \
        daemon.log()
