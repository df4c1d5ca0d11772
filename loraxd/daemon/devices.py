"""Where the workers run, decided by the supervisor before it starts them (it never imports
torch, so it asks NVML), and the limits a KV cache sized at start puts on the scheduler.

`plan_devices`: `device = cpu` asks nothing; `cuda` needs NVML and at least num_shard
visible GPUs (rank i on GPU i); `auto` is CUDA when NVML shows a GPU, the CPU when the host
has no NVIDIA driver, and refused when it has one that NVML cannot read (see loraxd/nvml.py).
The workers get the answer, never `auto`, so they cannot land where this did not check.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loraxd.nvml import NoGpu, Nvml, NvmlError, NvmlUnreadable


class DeviceRefused(Exception):
    """The workers cannot run where the config asks; one line."""


@dataclass(frozen=True)
class DevicePlan:
    device: str  # cpu | cuda
    nvml: Nvml | None = None  # open while the supervisor runs, on CUDA


def plan_devices(model, environ: Mapping[str, str],
                 open_nvml: Callable[[], Nvml] = Nvml.open) -> DevicePlan:
    """`model`: the [model] section; `environ`: the workers' environment."""
    if model.device == "cpu":
        return DevicePlan("cpu")
    try:
        nvml = open_nvml()
    except NoGpu as exc:
        if model.device == "cuda":
            raise DeviceRefused(f"device cuda, but {exc}") from None
        return _cpu(model, f"device auto found no GPU ({exc})")
    except NvmlUnreadable as exc:
        raise DeviceRefused(f"device {model.device}: {exc}; or set device = cpu") from None
    try:
        count = nvml.visible_count(environ)
    except NvmlError as exc:
        nvml.close()
        raise DeviceRefused(f"device {model.device}: {exc}") from None
    if count == 0 and model.device == "auto":
        nvml.close()
        return _cpu(model, "device auto found no visible GPU" + _visible(environ))
    if count < model.num_shard:
        nvml.close()
        raise DeviceRefused(f"num_shard {model.num_shard} needs {model.num_shard} GPUs (rank "
                            f"i on GPU i), but {count} are visible{_visible(environ)}")
    return DevicePlan("cuda", nvml)


def _cpu(model, why: str) -> DevicePlan:
    if model.cuda_memory_fraction != 1.0:
        raise DeviceRefused(f"cuda_memory_fraction = {model.cuda_memory_fraction:g}: {why}, "
                            "and a share of GPU memory means nothing on a CPU: only 1.0")
    if model.compile:
        raise DeviceRefused(f"compile = true: {why}, and CUDA graphs need a GPU")
    return DevicePlan("cpu")


def _visible(environ: Mapping[str, str]) -> str:
    value = environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f" (CUDA_VISIBLE_DEVICES={value})"


@dataclass(frozen=True)
class KvBounds:
    """What the running workers were started for: the tokens their KV cache holds when
    max_batch_total_tokens is unset (None: it is set, and the config's own rules hold),
    and how they were found; on CUDA, the prefill the activations' headroom was kept for."""

    sized_tokens: int | None
    prefill_tokens: int | None
    sized_by: str = ""  # "GPU memory" or "the CPU's default"


def kv_limits_error(scheduler, bounds: KvBounds) -> str | None:
    """Why these [scheduler] settings cannot run on the workers as started, or None."""
    if bounds.sized_tokens is not None:
        for name in ("max_total_tokens", "max_batch_prefill_tokens"):
            value = getattr(scheduler, name)
            if value > bounds.sized_tokens:
                fix = ("raise cuda_memory_fraction, or use more shards"
                       if bounds.sized_by == "GPU memory" else "set max_batch_total_tokens")
                return (f"{name} = {value}: more than the {bounds.sized_tokens} tokens the KV "
                        f"cache holds (max_batch_total_tokens is unset: sized by "
                        f"{bounds.sized_by}); lower it, or {fix}")
    if bounds.prefill_tokens is not None and \
            scheduler.max_batch_prefill_tokens > bounds.prefill_tokens:
        return (f"max_batch_prefill_tokens = {scheduler.max_batch_prefill_tokens}: the GPU "
                f"memory was shared out at start for steps of {bounds.prefill_tokens} "
                "prompt tokens; a larger value needs a restart")
    return None
