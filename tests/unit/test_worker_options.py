"""The worker's start-up options: one typed message with every field named by the
supervisor from the config tree, decoded strictly by the worker."""
import dataclasses

import msgspec
import pytest

from loraxd.config.tree import CPU_KV_TOKENS, Config
from loraxd.daemon.devices import DevicePlan, KvBounds
from loraxd.daemon.supervisor import Supervisor, WorkerStartError
from loraxd.nvml import GpuMemory, GpuUtilization
from loraxd.protocol.codec import decode_options
from loraxd.protocol.worker import Ready, WorkerOptions


def _config(**model):
    config = Config()
    adapters = dataclasses.replace(config.adapters, max_lora_rank=8, max_adapter_bytes=1234)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model),
                               adapters=adapters)


def test_options_carry_the_config():
    options = decode_options(Supervisor(_config(), "/m", workers=None)._options())
    assert options.max_lora_rank == 8 and options.max_adapter_bytes == 1234
    assert options.block_size == Config().scheduler.block_size
    assert options.master_port == 0  # one rank: no group, no port
    assert options.quantize is None and options.dtype == "float32"
    quantized = decode_options(Supervisor(_config(quantize="int8-weight-only",
                                                  dtype="bfloat16"), "/m", None)._options())
    assert quantized.quantize == "int8-weight-only" and quantized.dtype == "bfloat16"


def test_a_group_gets_a_free_port_unless_one_is_set():
    picked = decode_options(Supervisor(_config(num_shard=2), "/m", None)._options())
    assert picked.master_port > 0
    fixed = decode_options(Supervisor(_config(num_shard=2, master_port=29500), "/m",
                                      None)._options())
    assert fixed.master_port == 29500


def test_no_field_may_be_missing_or_unknown():
    text = Supervisor(_config(), "/m", None)._options()
    fields = msgspec.json.decode(text)
    assert set(fields) == set(WorkerOptions.__struct_fields__)
    del fields["max_lora_rank"]
    with pytest.raises(msgspec.ValidationError, match="max_lora_rank"):
        decode_options(msgspec.json.encode(fields).decode())
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        decode_options(msgspec.json.encode({**msgspec.json.decode(text),
                                            "surprise": 1}).decode())


# -- where the workers run and how their KV cache is sized ----------------------------------


def _ready(num_blocks: int, uuid: str = "") -> Ready:
    return Ready(rank=0, num_blocks=num_blocks, block_size=16, vocab_size=10, eos_token_ids=[],
                 max_position_embeddings=64, dtype="bfloat16", device="cuda:0",
                 architecture="LlamaForCausalLM", device_uuid=uuid)


def _on(device: str, **model) -> Supervisor:
    supervisor = Supervisor(_config(**model), "/m", None)
    supervisor.devices = DevicePlan(device)
    return supervisor


def test_the_workers_get_the_planned_device_and_the_kv_settings():
    cpu = decode_options(_on("cpu")._options())
    assert cpu.device == "cpu" and cpu.max_batch_total_tokens == CPU_KV_TOKENS
    cuda = decode_options(_on("cuda", cuda_memory_fraction=0.8)._options())
    assert cuda.device == "cuda" and cuda.max_batch_total_tokens == 0  # sized from memory
    assert cuda.cuda_memory_fraction == 0.8 and cuda.num_blocks == 0
    assert cuda.max_batch_prefill_tokens == Config().scheduler.max_batch_prefill_tokens
    assert cuda.collective_timeout_s == Config().worker.ready_timeout_s
    planned = Supervisor(_config(device="cpu"), "/m", None)
    assert decode_options(planned._options()).device == "cpu"  # planned at the first start


async def test_a_cache_sized_from_memory_is_pinned_for_the_replacements():
    supervisor = _on("cuda")
    await supervisor._settle_kv(_ready(1000))
    assert supervisor.kv_bounds == KvBounds(16000, 4096, "GPU memory")
    replacement = decode_options(supervisor._options())
    assert replacement.num_blocks == 1000 and replacement.max_batch_prefill_tokens == 4096


async def test_limits_beyond_the_sized_cache_refuse_the_start():
    supervisor = _on("cuda")
    with pytest.raises(WorkerStartError) as info:
        await supervisor._settle_kv(_ready(100))  # 1600 tokens < max_total_tokens 2048
    assert info.value.config_error
    assert str(info.value).startswith("max_total_tokens = 2048: more than the 1600 tokens the "
                                      "KV cache holds (max_batch_total_tokens is unset: sized "
                                      "by GPU memory)")
    cpu = _on("cpu")  # auto found no GPU: the CPU's default is checked the same way
    config = cpu.config
    cpu.config = dataclasses.replace(config, scheduler=dataclasses.replace(
        config.scheduler, max_total_tokens=40000, max_batch_prefill_tokens=40000))
    with pytest.raises(WorkerStartError, match="more than the 32768 tokens .* the CPU's default"):
        await cpu._settle_kv(_ready(2052))


def test_each_ranks_gpu_comes_from_nvml_live():
    supervisor = _on("cuda")
    reads = iter([GpuMemory("NVIDIA H200", 141 << 30, 100 << 30, 41 << 30, "GPU-aaaa"),
                  GpuMemory("NVIDIA H200", 141 << 30, 90 << 30, 51 << 30, "GPU-aaaa")])

    class FakeNvml:
        def memory(self, uuid):
            assert uuid == "aaaa"
            return next(reads)

        def utilization(self, uuid):
            return GpuUtilization(0.25, 0.5)

    supervisor.devices = DevicePlan("cuda", FakeNvml())
    first = supervisor._gpu_memory(_ready(10, uuid="aaaa"))
    assert first == {"device_name": "NVIDIA H200", "device_total_bytes": 141 << 30,
                     "device_free_bytes": 100 << 30, "device_used_bytes": 41 << 30,
                     "gpu_utilization": 0.25, "gpu_memory_utilization": 0.5}
    assert supervisor._gpu_memory(_ready(10, uuid="aaaa"))["device_free_bytes"] == 90 << 30
    assert supervisor._gpu_memory(_ready(10)) == {}  # a CPU rank has no UUID
