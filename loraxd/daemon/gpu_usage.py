"""Each CUDA rank's GPU as NVML sees it now, for /info, `loraxctl workers` and /metrics.

Read afresh at each ask: NVML answers from the driver, with no CUDA context and nothing
queued on the device, so no cache stands between a scrape and the GPU. What NVML refuses to
read is left out (the whole GPU when its memory cannot be read; the utilization alone where
NVML has none, as on a MIG instance), never fails the ask, and is logged once per rank and
kind, again at most every `WARN_EVERY_S` while it lasts.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraxd.nvml import GpuUtilization, Nvml, NvmlError

log = logging.getLogger(__name__)

WARN_EVERY_S = 300.0


@dataclass(frozen=True)
class RankGpu:
    rank: int
    uuid: str  # NVML's: GPU-... or MIG-...
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization: GpuUtilization | None  # None: NVML cannot say for this device now


class GpuReader:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._warned: dict[tuple[int, str], float] = {}  # (rank, kind) -> when last logged

    def read(self, nvml: Nvml, rank: int, device_uuid: str) -> RankGpu | None:
        try:
            memory = nvml.memory(device_uuid)
        except NvmlError as exc:
            self._warn(rank, "memory", exc)
            return None
        try:
            utilization = nvml.utilization(device_uuid)
        except NvmlError as exc:
            self._warn(rank, "utilization", exc)
            utilization = None
        return RankGpu(rank, memory.uuid, memory.name, memory.total_bytes, memory.free_bytes,
                       memory.used_bytes, utilization)

    def _warn(self, rank: int, kind: str, exc: NvmlError) -> None:
        now, last = self._clock(), self._warned.get((rank, kind))
        if last is None or now - last >= WARN_EVERY_S:
            self._warned[(rank, kind)] = now
            log.warning("rank %d: its GPU's %s cannot be read, left out of /info, loraxctl "
                        "and /metrics: %s", rank, kind, exc)
