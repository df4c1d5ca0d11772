"""NVML as the supervisor reads it, with a fake pynvml (no GPU here): the GPUs a worker may
use, each one's name and memory by UUID, and where the workers run (`plan_devices`), with
the start refused, in one line, where the config asks for what the host cannot give; and how
busy each GPU is."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from loraxd.config import Config
from loraxd.daemon.devices import DeviceRefused, plan_devices
from loraxd.nvml import DRIVER_PATH, GpuUtilization, NoGpu, Nvml, NvmlError, NvmlUnreadable

NOT_SUPPORTED, NOT_FOUND, NO_LIBRARY, NO_DRIVER, UNKNOWN = 3, 6, 12, 9, 999


class FakeNvmlError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(gpus: list[tuple[str, str, int, int]], init_error: int | None = None,
                busy: dict[str, tuple[int, int]] | None = None):
    """gpus: (uuid, name, total, free) in NVML's order; busy: uuid -> (gpu %, memory %), NVML's
    utilization rates (a GPU not named has none: NOT_SUPPORTED, as a MIG instance)."""
    calls = []

    def init():
        calls.append("init")
        if init_error is not None:
            raise FakeNvmlError(init_error)

    def by_uuid(uuid):
        for i, gpu in enumerate(gpus):
            if gpu[0] == uuid:
                return i
        raise FakeNvmlError(NOT_FOUND)

    def memory(handle):
        _, _, total, free = gpus[handle]
        return SimpleNamespace(total=total, free=free, used=total - free)

    def utilization(handle):
        if gpus[handle][0] not in (busy or {}):
            raise FakeNvmlError(NOT_SUPPORTED)
        gpu, memory = busy[gpus[handle][0]]
        return SimpleNamespace(gpu=gpu, memory=memory)

    return SimpleNamespace(
        NVMLError=FakeNvmlError, NVML_ERROR_LIBRARY_NOT_FOUND=NO_LIBRARY,
        NVML_ERROR_DRIVER_NOT_LOADED=NO_DRIVER, nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"), nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetName=lambda handle: gpus[handle][1],
        nvmlDeviceGetUtilizationRates=utilization, calls=calls)


H200 = [("GPU-aaaa", "NVIDIA H200", 141 << 30, 140 << 30),
        ("GPU-bbbb", "NVIDIA H200", 141 << 30, 100 << 30),
        ("GPU-cccc", b"NVIDIA H200", 141 << 30, 10 << 30)]  # an old pynvml gives bytes


def opener(module=None, *, driver: bool = True, tmp_path=None):
    """Nvml.open with `module` as pynvml (None: not installed), and a driver file or not."""
    driver_path = tmp_path / "version"
    if driver:
        driver_path.write_text("NVRM version: 550")
    else:
        driver_path.unlink(missing_ok=True)

    def importer(name):
        assert name == "pynvml"
        if module is None:
            raise ImportError("No module named 'pynvml'")
        return module
    return lambda: Nvml.open(import_module=importer, driver_path=driver_path)


def test_memory_by_uuid_as_torch_gives_it(tmp_path):
    nvml = opener(fake_pynvml(H200), tmp_path=tmp_path)()
    assert nvml.memory("bbbb").free_bytes == 100 << 30  # torch's uuid has no GPU- prefix
    assert nvml.memory("GPU-aaaa").total_bytes == 141 << 30
    assert nvml.memory("cccc").name == "NVIDIA H200"
    with pytest.raises(NvmlError, match="no device with UUID dddd"):
        nvml.memory("dddd")
    gpu = nvml.memory("bbbb")
    assert (gpu.uuid, gpu.used_bytes) == ("GPU-bbbb", 41 << 30)  # NVML's own UUID, for labels


def test_utilization_as_fractions_and_none_to_read_is_an_error(tmp_path):
    nvml = opener(fake_pynvml(H200, busy={"GPU-aaaa": (37, 5)}), tmp_path=tmp_path)()
    assert nvml.utilization("aaaa") == GpuUtilization(0.37, 0.05)
    with pytest.raises(NvmlError, match="^NVML: .*: NVML error 3$"):
        nvml.utilization("bbbb")
    with pytest.raises(NvmlError, match="no device with UUID dddd"):
        nvml.utilization("dddd")


@pytest.mark.parametrize("visible, count", [
    (None, 3), ("0,1", 2), ("2", 1), ("", 0), ("0,7,1", 1),  # CUDA stops at a bad entry
    ("GPU-cccc,GPU-aaaa", 2), ("GPU-zzzz", 0), ("-1", 0), ("1,0,2", 3),
])
def test_the_gpus_a_worker_may_use_follow_cuda_visible_devices(tmp_path, visible, count):
    nvml = opener(fake_pynvml(H200), tmp_path=tmp_path)()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert nvml.visible_count(environ) == count


def test_no_driver_is_no_gpu_but_a_driver_nvml_cannot_read_is_refused(tmp_path):
    with pytest.raises(NoGpu):  # a CPU host: neither pynvml nor a driver
        opener(None, driver=False, tmp_path=tmp_path)()
    with pytest.raises(NoGpu):  # pynvml installed, no driver: NVML's library is not found
        opener(fake_pynvml([], init_error=NO_LIBRARY), driver=False, tmp_path=tmp_path)()
    with pytest.raises(NvmlUnreadable, match="pynvml is not installed: install loraxd"):
        opener(None, tmp_path=tmp_path)()
    with pytest.raises(NvmlUnreadable, match="NVML cannot be initialized: NVML error 999"):
        opener(fake_pynvml(H200, init_error=UNKNOWN), tmp_path=tmp_path)()
    with pytest.raises(NvmlUnreadable):  # the driver is there: its NVML must answer
        opener(fake_pynvml(H200, init_error=NO_DRIVER), tmp_path=tmp_path)()


def model(**fields):
    return dataclasses.replace(Config().model, **fields)


def test_cuda_needs_as_many_visible_gpus_as_shards(tmp_path):
    module = fake_pynvml(H200)
    plan = plan_devices(model(device="cuda", num_shard=3), {}, opener(module, tmp_path=tmp_path))
    assert plan.device == "cuda" and plan.nvml is not None
    with pytest.raises(DeviceRefused) as info:
        plan_devices(model(device="cuda", num_shard=2), {"CUDA_VISIBLE_DEVICES": "1"},
                     opener(module, tmp_path=tmp_path))
    assert str(info.value) == ("num_shard 2 needs 2 GPUs (rank i on GPU i), but 1 are visible "
                               "(CUDA_VISIBLE_DEVICES=1)")
    assert module.calls[-1] == "shutdown"  # a refused plan leaves NVML closed
    with pytest.raises(DeviceRefused, match="^num_shard 4 needs 4 GPUs .* but 3 are visible$"):
        plan_devices(model(device="auto", num_shard=4), {}, opener(module, tmp_path=tmp_path))


def test_auto_is_cuda_with_a_gpu_and_the_cpu_without_a_driver(tmp_path):
    gpu = plan_devices(model(), {}, opener(fake_pynvml(H200), tmp_path=tmp_path))
    assert gpu.device == "cuda"
    cpu = plan_devices(model(), {}, opener(None, driver=False, tmp_path=tmp_path))
    assert cpu == plan_devices(model(), {"CUDA_VISIBLE_DEVICES": ""},
                               opener(fake_pynvml(H200), tmp_path=tmp_path))
    assert cpu.device == "cpu" and cpu.nvml is None
    assert plan_devices(model(device="cpu"), {}, lambda: pytest.fail("NVML asked")).device == "cpu"


@pytest.mark.parametrize("fields, module, driver, refused", [
    (dict(device="cuda"), None, False, "^device cuda, but no NVIDIA driver"),
    (dict(device="cuda"), None, True, "^device cuda: an NVIDIA driver is loaded, but pynvml is "
                                      "not installed: install loraxd.gpu.; or set device = cpu$"),
    (dict(), None, True, "^device auto: an NVIDIA driver is loaded, but pynvml"),
    (dict(cuda_memory_fraction=0.5), None, False, r"^cuda_memory_fraction = 0.5: device auto "
     r"found no GPU \(no NVIDIA driver \(and no pynvml\)\), and a share of GPU memory means "
     r"nothing on a CPU: only 1.0$"),
    (dict(compile=True), None, False, r"^compile = true: device auto found no GPU \(no NVIDIA "
     r"driver \(and no pynvml\)\), and CUDA graphs need a GPU$"),
])
def test_what_the_host_cannot_give_is_refused_in_one_line(tmp_path, fields, module, driver,
                                                          refused):
    with pytest.raises(DeviceRefused, match=refused):
        plan_devices(model(**fields), {}, opener(module, driver=driver, tmp_path=tmp_path))


def test_the_real_pynvml_on_a_host_without_a_driver_is_no_gpu():
    """nvidia-ml-py itself (the test extra has it): its 'library not found' is no GPU."""
    pytest.importorskip("pynvml")
    if DRIVER_PATH.exists():
        pytest.skip("this host has an NVIDIA driver")
    with pytest.raises(NoGpu, match="NVML Shared Library Not Found"):
        Nvml.open()
