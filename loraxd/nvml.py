"""The GPUs as NVML sees them, for the supervisor (which never imports torch): how many this
process may use, and each one's name, memory and utilization now.

pynvml (the `gpu` extra: nvidia-ml-py) is imported only when asked, so a CPU host needs
neither it nor a driver. `Nvml.open()` tells three cases apart:

- NVML answers: a GPU host; its devices are counted and read.
- no NVIDIA driver (no NVML library, no driver loaded, nothing under /proc/driver/nvidia):
  `NoGpu`, and `device = auto` means the CPU.
- a driver but NVML cannot be read (pynvml missing, or NVML failing): `NvmlUnreadable`,
  and the start is refused even under `auto`, naming why. Running such a host on its CPU
  would leave its GPUs idle without a word; running it on CUDA would leave the GPU count
  unchecked and the ranks' memory unknown.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

DRIVER_PATH = Path("/proc/driver/nvidia/version")  # there while the NVIDIA driver is loaded


class NvmlError(Exception):
    """NVML cannot say; the message is one line."""


class NoGpu(NvmlError):
    """This host has no NVIDIA driver: no GPU to use."""


class NvmlUnreadable(NvmlError):
    """There is a driver, but NVML cannot be read."""


@dataclass(frozen=True)
class GpuMemory:
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int = 0
    uuid: str = ""  # NVML's own: GPU-... or MIG-...


@dataclass(frozen=True)
class GpuUtilization:
    """NVML's utilization rates over its last sample period (1/6 s to 1 s), as 0..1."""

    gpu: float  # the share of the period a kernel ran
    memory: float  # the share of it device memory was read or written


class Nvml:
    """An initialized NVML; `close()` ends it."""

    def __init__(self, module):
        self._nvml = module

    @classmethod
    def open(cls, import_module: Callable = importlib.import_module,
             driver_path: Path = DRIVER_PATH) -> Nvml:
        """NVML initialized; NoGpu or NvmlUnreadable (see the module's doc) otherwise."""
        try:
            module = import_module("pynvml")
        except ImportError:
            if driver_path.exists():
                raise NvmlUnreadable("an NVIDIA driver is loaded, but pynvml is not "
                                     "installed: install loraxd[gpu]") from None
            raise NoGpu("no NVIDIA driver (and no pynvml)") from None
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            if _no_driver(module, exc) and not driver_path.exists():
                raise NoGpu(f"no NVIDIA driver: NVML says {exc}") from None
            raise NvmlUnreadable(f"NVML cannot be initialized: {exc}") from None
        return cls(module)

    def visible_count(self, environ: Mapping[str, str] = os.environ) -> int:
        """The GPUs CUDA will number 0.. for a process with this environment: those that
        CUDA_VISIBLE_DEVICES names (CUDA stops at the first entry it cannot read), else
        all of them."""
        total = self._call(self._nvml.nvmlDeviceGetCount)
        value = environ.get("CUDA_VISIBLE_DEVICES")
        if value is None:
            return total
        count = 0
        for entry in (e.strip() for e in value.split(",")):
            if entry.isdigit() and int(entry) < total:
                count += 1
            elif entry.startswith(("GPU-", "MIG-")) and self._handle(entry) is not None:
                count += 1
            else:
                break
        return count

    def memory(self, uuid: str) -> GpuMemory:
        """The name and memory now of the device whose CUDA UUID is `uuid` (as torch gives
        it: no GPU-/MIG- prefix needed)."""
        name, handle = self._device(uuid)
        info = self._call(self._nvml.nvmlDeviceGetMemoryInfo, handle)
        device = self._call(self._nvml.nvmlDeviceGetName, handle)
        if isinstance(device, bytes):  # older pynvml
            device = device.decode(errors="replace")
        return GpuMemory(device, int(info.total), int(info.free), int(info.used), name)

    def utilization(self, uuid: str) -> GpuUtilization:
        """How busy the device is (NvmlError where NVML cannot say, as on a MIG instance)."""
        rates = self._call(self._nvml.nvmlDeviceGetUtilizationRates, self._device(uuid)[1])
        return GpuUtilization(int(rates.gpu) / 100, int(rates.memory) / 100)

    def _device(self, uuid: str):
        """(NVML's UUID, its handle) for a UUID with or without the GPU-/MIG- prefix."""
        candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}",
                                                                         f"MIG-{uuid}"]
        for name in candidates:
            handle = self._handle(name)
            if handle is not None:
                return name, handle
        raise NvmlError(f"NVML has no device with UUID {uuid}")

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass

    def _handle(self, uuid: str):
        try:
            return self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        except self._nvml.NVMLError:
            return None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            raise NvmlError(f"NVML: {fn.__name__}: {exc}") from None


def _no_driver(module, exc: Exception) -> bool:
    """NVML's own 'no library' and 'no driver' errors."""
    codes = {getattr(module, name, None) for name in ("NVML_ERROR_LIBRARY_NOT_FOUND",
                                                       "NVML_ERROR_DRIVER_NOT_LOADED")}
    return getattr(exc, "value", None) in codes - {None}
