"""On a real GPU: NVML's numbers against torch's, the KV cache sized from free memory within
cuda_memory_fraction, the activations' headroom covering a real prefill, and a daemon whose
/info, `loraxctl workers` and /metrics show each rank's GPU. Skipped without CUDA
(conftest.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pynvml")
transformers = pytest.importorskip("transformers")

from loraxd.nvml import Nvml  # noqa: E402
from loraxd.protocol.worker import NewSeq, SamplingParams, Step  # noqa: E402
from loraxd.worker import kv_plan, kv_sizing  # noqa: E402
from loraxd.worker.runner import KvSizing, ModelRunner  # noqa: E402

pytestmark = pytest.mark.gpu
GIB = 1 << 30


@pytest.fixture
def nvml():
    handle = Nvml.open()
    yield handle
    handle.close()


def test_nvml_agrees_with_torch_on_every_visible_gpu(nvml):
    assert nvml.visible_count() == torch.cuda.device_count()
    for i in range(torch.cuda.device_count()):
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(i)
        gpu = nvml.memory(str(torch.cuda.get_device_properties(i).uuid))
        assert gpu.name == torch.cuda.get_device_name(i)
        # NVML counts memory the driver reserves; the CUDA runtime does not: a few percent
        assert abs(gpu.total_bytes - total) <= 0.03 * total, (gpu.total_bytes, total)
        assert abs(gpu.free_bytes - free) <= 0.03 * total + GIB, (gpu.free_bytes, free)


def _wide_model(path):
    """Big enough that the per-token estimate, not the fixed 256 MiB, is what is checked."""
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024,
                                      intermediate_size=4096, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def test_the_cache_takes_the_share_left_and_the_headroom_covers_a_prefill(tmp_path):
    fraction, prefill = 0.5, 2048
    runner = ModelRunner(_wide_model(tmp_path), device="cuda", dtype="bfloat16",
                         block_size=16, max_batch_total_tokens=None,
                         kv=KvSizing(memory_fraction=fraction, max_prefill_tokens=prefill))
    headroom = kv_sizing.activation_headroom_bytes(kv_plan.step_widths(runner), prefill)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    left = free - (1 - fraction) * total  # what the share still allows: about the headroom
    assert 0.9 * headroom <= left <= headroom + 256 * (1 << 20), (left, headroom)
    assert runner.num_blocks * 16 >= prefill
    # one prefill of `prefill` tokens asking prompt logprobs stays within the headroom
    blocks = list(range(prefill // 16))
    step = Step(1, new_seqs=[NewSeq(1, [(7 * i) % 32000 for i in range(prefill)], blocks,
                                    SamplingParams(prompt_logprobs=True))])
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.execute(step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= headroom - kv_sizing.FIXED_HEADROOM_BYTES, (peak, headroom)


def test_info_loraxctl_and_metrics_show_each_ranks_gpu_from_nvml(default_model_dir, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration import tiny_model
    from tests.integration.daemon import Daemon

    import requests
    root = tiny_model.build(default_model_dir, tmp_path / "m", adapters=())
    free, total = torch.cuda.mem_get_info(0)
    share = min(1.0, (total - free + 3 * GIB) / total)  # about 2 GiB of cache, on any GPU
    d = Daemon(root / "model", tmp_path, "--device", "cuda", "--dtype", "bfloat16",
               "--cuda-memory-fraction", f"{share:.4f}", "--max-batch-prefill-tokens", "512",
               "--max-input-length", "256", "--max-total-tokens", "512").wait_ready()
    try:
        info = requests.get(d.url + "/info", timeout=30).json()
        out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                              str(d.runtime_dir / "control.sock"), "workers", "--json"],
                             capture_output=True, text=True, timeout=30)
        table = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                                str(d.runtime_dir / "control.sock"), "workers"],
                               capture_output=True, text=True, timeout=30).stdout
        metrics = requests.get(d.url + "/metrics", timeout=30).text
    finally:
        d.stop()
    rank = info["ranks"][0]
    assert rank["device"] == "cuda:0"
    assert rank["device_name"] == torch.cuda.get_device_name(0)
    assert abs(rank["device_total_bytes"] - total) <= 0.03 * total
    assert 0 < rank["device_free_bytes"] < rank["device_total_bytes"]
    assert info["max_batch_total_tokens"] >= info["max_total_tokens"]  # sized, in force
    assert 0 <= rank["gpu_utilization"] <= 1 and 0 <= rank["gpu_memory_utilization"] <= 1
    worker = json.loads(out.stdout)["workers"][0]
    assert worker["device_name"] == rank["device_name"] and worker["device_total_bytes"] > 0
    head, row = table.splitlines()[:2]
    assert "UTIL" in head.split() and re.search(r"  \d+%/\d+%  ", row), table
    gpu = {"rank": "0", "gpu": f"GPU-{torch.cuda.get_device_properties(0).uuid}"}
    series = {f.name: [s for s in f.samples if s.labels == gpu]
              for f in text_string_to_metric_families(metrics) if f.name.startswith("loraxd_gpu")}
    assert {name: len(samples) for name, samples in series.items()} == dict.fromkeys(
        ["loraxd_gpu_memory_used_bytes", "loraxd_gpu_memory_total_bytes",
         "loraxd_gpu_utilization_ratio", "loraxd_gpu_memory_utilization_ratio"], 1), metrics
    assert series["loraxd_gpu_memory_total_bytes"][0].value == rank["device_total_bytes"]
    assert series["loraxd_gpu_memory_used_bytes"][0].value > GIB  # the KV cache, at least
    assert 0 <= series["loraxd_gpu_utilization_ratio"][0].value <= 1
