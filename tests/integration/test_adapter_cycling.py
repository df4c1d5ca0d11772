"""64 adapters through 8 slots under steady load: all complete, and nobody waits for a slot
much longer than one cycle plus one load."""
from __future__ import annotations

import asyncio
import random
import shutil
import statistics

import pytest

from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

NUM_ADAPTERS, NUM_SLOTS, CYCLE_S = 64, 8, 1.0


@pytest.fixture(scope="module")
def tiny_model(default_model_dir, tmp_path_factory):
    """A small random Llama with the default model's tokenizer, and 64 adapters for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    model_dir, adapters = root / "model", root / "adapters"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=2, bos_token_id=1)
    base = LlamaForCausalLM(config)
    base.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir / name, model_dir / name)
    for i in range(NUM_ADAPTERS):
        cfg = LoraConfig(r=[4, 8, 16][i % 3], target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False)
        model = get_peft_model(base, cfg)
        model.save_pretrained(adapters / f"a{i}")
        base = model.unload()
    return model_dir, adapters


async def _load(url: str, num_clients: int, per_client: int) -> list[tuple[int, float]]:
    import aiohttp
    rng = random.Random(1)
    results = []
    async with aiohttp.ClientSession() as session:
        async def client():
            for _ in range(per_client):
                body = {"inputs": "Hello there", "parameters": {
                    "max_new_tokens": 8, "ignore_eos_token": True,
                    "adapter_id": f"a{rng.randrange(NUM_ADAPTERS)}"}}
                async with session.post(url + "/generate", json=body) as resp:
                    await resp.read()
                    queue_ms = float(resp.headers.get("x-queue-time", "nan"))
                    results.append((resp.status, queue_ms / 1000))
        await asyncio.gather(*(client() for _ in range(num_clients)))
    return results


def test_64_adapters_cycle_through_8_slots(tiny_model, tmp_path):
    model_dir, adapters = tiny_model
    d = Daemon(model_dir, tmp_path, "--local-adapter-dir", str(adapters),
               "--adapter-source", "local", "--max-active-adapters", str(NUM_SLOTS),
               "--adapter-cycle-time-s", str(CYCLE_S), "--max-total-tokens", "256",
               "--max-input-length", "128")
    try:
        d.wait_ready()
        results = asyncio.run(_load(d.url, num_clients=24, per_client=8))
    finally:
        d.stop()
    statuses = [s for s, _ in results]
    assert statuses == [200] * len(results), statuses
    waits = sorted(w for _, w in results)
    p99 = waits[int(0.99 * (len(waits) - 1))]
    print(f"queue time: median {statistics.median(waits) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms over {len(waits)} requests")
    # one cycle plus one (cold, tiny) load, with slack for a shared 2-core machine
    assert p99 < CYCLE_S + 2.0
