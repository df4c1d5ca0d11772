"""Each rank's GPU in /metrics, through the supervisor and NVML over a fake pynvml, read back
with prometheus-client's parser: used/total memory and utilization per rank and GPU, read at
each scrape; no series at all on a CPU; NVML failing leaves series out, never the scrape."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from loraxd.config.tree import Config
from loraxd.daemon import gpu_usage
from loraxd.daemon.devices import DevicePlan
from loraxd.daemon.supervisor import Supervisor
from loraxd.http.app import make_app
from loraxd.nvml import NvmlError
from loraxd.protocol.worker import Ready
from tests.unit.test_http_native import make_config
from tests.unit.test_metrics import StatsEngine, scrape, value
from tests.unit.test_nvml import H200, UNKNOWN, FakeNvmlError, fake_pynvml, opener

GPU_SERIES = ("loraxd_gpu_memory_used_bytes", "loraxd_gpu_memory_total_bytes",
              "loraxd_gpu_utilization_ratio", "loraxd_gpu_memory_utilization_ratio")


def _ready(rank: int, uuid: str) -> Ready:
    return Ready(rank=rank, num_blocks=100, block_size=16, vocab_size=10, eos_token_ids=[],
                 max_position_embeddings=64, dtype="bfloat16", device=f"cuda:{rank}",
                 architecture="LlamaForCausalLM", device_uuid=uuid)


def supervisor_on(plan: DevicePlan, uuids: list[str]) -> Supervisor:
    """A supervisor whose ranks are ready, on the GPUs torch named by these UUIDs."""
    ready = {rank: _ready(rank, uuid) for rank, uuid in enumerate(uuids)}
    supervisor = Supervisor(Config(), "/m", SimpleNamespace(ready_ranks=ready))
    supervisor.devices, supervisor.ready = plan, ready[0]
    return supervisor


@pytest.fixture
async def serve():
    clients = []

    async def start(gpus):
        client = TestClient(TestServer(make_app(StatsEngine(), make_config(), gpus=gpus)))
        await client.start_server()
        clients.append(client)
        return client
    yield start
    for client in clients:
        await client.close()


async def test_each_ranks_gpu_is_read_at_each_scrape(serve, tmp_path):
    module = fake_pynvml(H200, busy={"GPU-aaaa": (37, 5), "GPU-bbbb": (100, 80)})
    nvml = opener(module, tmp_path=tmp_path)()
    supervisor = supervisor_on(DevicePlan("cuda", nvml), ["aaaa", "bbbb"])  # torch's UUIDs
    client = await serve(supervisor.gpus)
    fams = await scrape(client)
    for name in GPU_SERIES:
        assert fams[name].type == "gauge"
        assert [s.labels for s in fams[name].samples] == [
            {"rank": "0", "gpu": "GPU-aaaa"}, {"rank": "1", "gpu": "GPU-bbbb"}]
    assert value(fams, "loraxd_gpu_memory_total_bytes", rank="0") == 141 << 30
    assert value(fams, "loraxd_gpu_memory_used_bytes", rank="0") == 1 << 30
    assert value(fams, "loraxd_gpu_memory_used_bytes", rank="1") == 41 << 30
    assert value(fams, "loraxd_gpu_utilization_ratio", gpu="GPU-aaaa") == 0.37
    assert value(fams, "loraxd_gpu_memory_utilization_ratio", gpu="GPU-aaaa") == 0.05
    assert value(fams, "loraxd_gpu_utilization_ratio", gpu="GPU-bbbb") == 1.0
    module.nvmlDeviceGetUtilizationRates = lambda handle: SimpleNamespace(gpu=12, memory=3)
    again = await scrape(client)  # nothing kept between scrapes
    assert value(again, "loraxd_gpu_utilization_ratio", rank="1") == 0.12


async def test_a_cpu_host_has_no_gpu_series_at_all(serve):
    cpu = supervisor_on(DevicePlan("cpu"), [""])
    for gpus in (cpu.gpus, None):
        text = await (await (await serve(gpus)).get("/metrics")).text()
        assert "loraxd_gpu_" not in text  # neither samples nor HELP/TYPE lines
    assert cpu.gpus() == []


async def test_nvml_failing_leaves_series_out_and_is_logged_once(serve, tmp_path, caplog):
    module = fake_pynvml(H200, busy={"GPU-aaaa": (37, 5)})  # GPU-bbbb: MIG-like, no rates
    nvml = opener(module, tmp_path=tmp_path)()
    supervisor = supervisor_on(DevicePlan("cuda", nvml), ["aaaa", "bbbb", "cccc"])
    memory = module.nvmlDeviceGetMemoryInfo

    def memory_but_cccc(handle):
        if handle == 2:
            raise FakeNvmlError(UNKNOWN)
        return memory(handle)
    module.nvmlDeviceGetMemoryInfo = memory_but_cccc
    client = await serve(supervisor.gpus)
    with caplog.at_level(logging.WARNING, logger=gpu_usage.__name__):
        for _ in range(3):
            fams = await scrape(client)
    ranks = {name: [s.labels["rank"] for s in fams[name].samples] for name in GPU_SERIES}
    assert ranks == {"loraxd_gpu_memory_used_bytes": ["0", "1"],
                     "loraxd_gpu_memory_total_bytes": ["0", "1"],
                     "loraxd_gpu_utilization_ratio": ["0"],
                     "loraxd_gpu_memory_utilization_ratio": ["0"]}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once each, not once a scrape
    assert warnings[0].startswith("rank 1: its GPU's utilization cannot be read")
    assert warnings[1].startswith("rank 2: its GPU's memory cannot be read")
    assert fams["loraxd_requests_running"].samples  # the rest of the scrape is there
    module.nvmlDeviceGetUtilizationRates = lambda handle: (_ for _ in ()).throw(
        FakeNvmlError(UNKNOWN))  # no GPU has rates now: those names are gone, not empty
    names = {name for name in await scrape(client) if name.startswith("loraxd_gpu_")}
    assert names == {"loraxd_gpu_memory_used_bytes", "loraxd_gpu_memory_total_bytes"}


def test_a_lasting_failure_is_logged_again_after_a_while(caplog):
    now = [0.0]
    reader = gpu_usage.GpuReader(clock=lambda: now[0])
    broken = SimpleNamespace(memory=lambda uuid: (_ for _ in ()).throw(
        NvmlError("NVML: nvmlDeviceGetMemoryInfo: GPU is lost")))
    with caplog.at_level(logging.WARNING, logger=gpu_usage.__name__):
        for t in (0.0, 1.0, gpu_usage.WARN_EVERY_S - 1, gpu_usage.WARN_EVERY_S):
            now[0] = t
            assert reader.read(broken, 0, "aaaa") is None
    assert len(caplog.records) == 2 and "GPU is lost" in caplog.records[1].getMessage()


async def test_a_read_that_raises_anything_fails_no_scrape(serve):
    def broken():
        raise RuntimeError("a pynvml without the call")
    fams = await scrape(await serve(broken))
    assert not [name for name in fams if name.startswith("loraxd_gpu_")]
    assert fams["loraxd_steps"].samples
