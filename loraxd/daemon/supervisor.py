"""Start, watch and restart the worker processes.

Workers are fresh interpreters (`python -m loraxd.worker.main`), never forks of the event
loop. Each has a watcher task awaiting its exit: an unexpected exit marks the worker
socket lost at once, which wakes whoever waits on it. `ranks()` describes each rank for
`loraxctl workers`.

Before the first start, `plan_devices` decides where the ranks run (see devices.py); on
CUDA, NVML then gives each rank's device name and memory, live, to `/info` and `loraxctl
workers`. A KV cache sized from free memory at the first start is pinned: replacement
groups must hold the same pages, since the scheduler keeps handing out their ids.

`replace()` is the engine's recovery: it kills every rank (a hung one never answers a
Shutdown), then starts them again after an exponential backoff. At most
`worker.max_restarts` restarts happen within `worker.restart_window_s`; one more raises
RestartBudgetSpent, and the daemon exits 1 so that its own supervisor starts it afresh.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass

from loraxd.config.tree import CPU_KV_TOKENS
from loraxd.daemon.devices import (DevicePlan, DeviceRefused, KvBounds, kv_limits_error,
                                   plan_devices)
from loraxd.daemon.notify import child_environment
from loraxd.daemon.proc import process_state, rss_bytes
from loraxd.engine.worker_client import ModelUnsupported, WorkerClient
from loraxd.logs import current_level
from loraxd.daemon.gpu_usage import GpuReader, RankGpu
from loraxd.protocol.codec import encode_options
from loraxd.protocol.worker import Ready, Shutdown, WorkerOptions

log = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0
_MAX_BACKOFF_S = 30.0


class WorkerStartError(Exception):
    def __init__(self, message: str, *, config_error: bool = False):
        super().__init__(message)
        self.config_error = config_error  # the model or a setting can't be run: exit 78


class RestartBudgetSpent(WorkerStartError):
    """The workers died more often than `worker.max_restarts` allows."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    pid: int | None  # None: not running
    device: str  # "" until the rank is ready
    state: str  # starting | ready | stopped (SIGSTOP) | zombie | exited
    rss_bytes: int
    uptime_s: float
    restarts: int
    weight_bytes: int = 0  # this rank's shard, once ready
    kv_cache_bytes: int = 0
    device_name: str = ""  # CUDA only, from NVML, as are the two below
    device_total_bytes: int = 0
    device_free_bytes: int = 0
    device_used_bytes: int = 0
    gpu_utilization: float | None = None  # 0..1, from NVML; None where it cannot say
    gpu_memory_utilization: float | None = None


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the rendezvous of a new group)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Supervisor:
    def __init__(self, config, model_dir: str, workers: WorkerClient):
        self.config = config  # swapped whole by a reload
        self.model_dir = model_dir
        self.workers = workers
        self.world_size = config.model.num_shard
        self.ready: Ready | None = None
        self._procs: list[asyncio.subprocess.Process] = []
        self._watchers: list[asyncio.Task] = []
        self._started_at = 0.0
        self._stopping = False
        self._restarts = 0
        self._restart_times: deque[float] = deque()  # within the restart window
        self.devices: DevicePlan | None = None  # planned at the first start
        self._gpus = GpuReader()
        self.kv_bounds = KvBounds(None, None)  # what the first group was started for
        self._pinned_blocks = 0

    def _plan_devices(self) -> DevicePlan:
        if self.devices is None:
            try:
                self.devices = plan_devices(self.config.model, child_environment())
            except DeviceRefused as exc:
                raise WorkerStartError(str(exc), config_error=True) from None
            log.info("the workers run on %s", self.devices.device)
        return self.devices

    def _kv_tokens(self, device: str) -> int:
        """WorkerOptions.max_batch_total_tokens: 0 sizes the cache from free memory."""
        tokens = self.config.scheduler.max_batch_total_tokens
        if tokens is None:
            return CPU_KV_TOKENS if device == "cpu" else 0
        return tokens

    def _options(self) -> str:
        c = self.config
        port = c.model.master_port
        if self.world_size > 1 and port == 0:  # a fresh port per group: no stale rendezvous
            port = free_port(c.model.master_addr)
        device = self._plan_devices().device
        prefill = self.kv_bounds.prefill_tokens or c.scheduler.max_batch_prefill_tokens
        return encode_options(WorkerOptions(
            dtype=c.model.dtype, quantize=c.model.quantize, device=device, block_size=c.scheduler.block_size,
            max_batch_total_tokens=self._kv_tokens(device),
            cuda_memory_fraction=c.model.cuda_memory_fraction,
            max_batch_prefill_tokens=prefill, num_blocks=self._pinned_blocks,
            collective_timeout_s=c.worker.ready_timeout_s,
            num_threads=c.worker.num_threads,
            max_active_adapters=c.adapters.max_active_adapters,
            adapter_memory_bytes=c.adapters.adapter_memory_bytes,
            max_lora_rank=c.adapters.max_lora_rank,
            max_adapter_bytes=c.adapters.max_adapter_bytes,
            master_addr=c.model.master_addr, master_port=port,
            log_level=current_level(), json_output=c.server.json_output,
            watermark_gamma=c.worker.watermark_gamma, watermark_delta=c.worker.watermark_delta,
            kernel_dir=os.path.join(c.paths.cache_dir, "kernels"), compile=c.model.compile))

    async def start(self) -> Ready:
        """Spawn every rank and wait for their Ready while checking they stay alive."""
        self.workers.reset()
        self.ready = None
        options = self._options()
        self._started_at = time.monotonic()
        for rank in range(self.world_size):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loraxd.worker.main", "--endpoint", self.workers.endpoint,
                "--rank", str(rank), "--world-size", str(self.world_size),
                "--model-dir", str(self.model_dir), "--options", options,
                env=child_environment())
            self._procs.append(proc)
            self._watchers.append(asyncio.create_task(self._watch(rank, proc),
                                                      name=f"watch-rank-{rank}"))
        try:
            async with asyncio.timeout(self.config.worker.ready_timeout_s):
                ready = await self.workers.handshake()
        except TimeoutError as exc:
            await self.kill()
            raise WorkerStartError("the workers did not become ready within "
                                   f"{self.config.worker.ready_timeout_s:g} s") from exc
        except Exception as exc:
            await self.kill()
            raise WorkerStartError(str(exc),
                                   config_error=isinstance(exc, ModelUnsupported)) from exc
        log.info("%d worker(s) ready: %s on %s, %d KV pages of %d tokens", self.world_size,
                 ready.dtype, ready.device, ready.num_blocks, ready.block_size)
        if not self._pinned_blocks:
            await self._settle_kv(ready)
        self.ready = ready
        return ready

    async def _settle_kv(self, ready: Ready) -> None:
        """After the first start: pin a cache sized from free memory, and check the
        scheduler's limits against it (a reload is checked the same way)."""
        scheduler = self.config.scheduler
        cuda = self.devices is not None and self.devices.device == "cuda"
        unset = scheduler.max_batch_total_tokens is None
        prefill = scheduler.max_batch_prefill_tokens if cuda else None
        if not unset:
            bounds = KvBounds(None, prefill)
        elif cuda:
            bounds = KvBounds(ready.num_blocks * ready.block_size, prefill, "GPU memory")
        else:
            bounds = KvBounds(CPU_KV_TOKENS, None, "the CPU's default")
        error = kv_limits_error(scheduler, bounds)
        if error is not None:
            await self.kill()
            raise WorkerStartError(error, config_error=True)
        self.kv_bounds = bounds
        if unset and cuda:
            self._pinned_blocks = ready.num_blocks

    async def replace(self) -> Ready:
        """Kill every rank and start them again, with backoff, within the restart budget."""
        await self.kill()
        while True:
            delay = self._count_restart()
            log.info("restarting the workers in %.1f s (restart %d of %d within %g s)", delay,
                     len(self._restart_times), self.config.worker.max_restarts,
                     self.config.worker.restart_window_s)
            await asyncio.sleep(delay)
            try:
                return await self.start()
            except WorkerStartError as exc:
                if exc.config_error:
                    raise
                log.error("the workers did not start: %s", exc)

    def _count_restart(self) -> float:
        """The backoff before this restart; RestartBudgetSpent past the budget."""
        w = self.config.worker
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > w.restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= w.max_restarts:
            raise RestartBudgetSpent(
                f"the workers failed {len(self._restart_times) + 1} times within "
                f"{w.restart_window_s:g} s (worker.max_restarts = {w.max_restarts})")
        self._restart_times.append(now)
        self._restarts += 1
        return min(w.restart_backoff_s * 2 ** (len(self._restart_times) - 1), _MAX_BACKOFF_S)

    async def _watch(self, rank: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not self._stopping:
            log.error("worker rank %d (pid %d) exited with status %s", rank, proc.pid, code)
            self.workers.mark_lost()

    async def kill(self) -> None:
        """SIGKILL every rank at once: for workers that are lost, hung or half started."""
        self._stopping = True
        for proc in self._procs:
            if proc.returncode is None:
                proc.kill()
        await self._reap()
        self._stopping = False

    async def stop(self) -> None:
        """Shutdown, then SIGKILL what is left after one grace period; a stopped (SIGSTOP)
        rank can read nothing, so it is killed at once."""
        self._stopping = True
        for proc in self._procs:
            if proc.returncode is None and process_state(proc.pid) == "stopped":
                proc.kill()
        if any(p.returncode is None for p in self._procs):
            try:
                await asyncio.wait_for(self.workers.broadcast(Shutdown()), 1.0)
            except Exception:  # noqa: BLE001 - the workers may already be gone
                pass
        try:  # one grace period for all: a hung rank is killed, however many there are
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self._procs)),
                                   _STOP_GRACE_S)
        except TimeoutError:
            for proc in self._procs:
                if proc.returncode is None:
                    proc.kill()
        await self._reap()
        if self.devices is not None and self.devices.nvml is not None:
            self.devices.nvml.close()
            self.devices = None

    async def _reap(self) -> None:
        await asyncio.gather(*(p.wait() for p in self._procs))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._procs, self._watchers = [], []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.returncode is None]

    def rank_summaries(self) -> list[dict]:
        """/info's view of each rank: where it runs and the memory it holds."""
        return [{"rank": r.rank, "device": r.device, "state": r.state,
                 "weight_bytes": r.weight_bytes, "kv_cache_bytes": r.kv_cache_bytes,
                 "rss_bytes": r.rss_bytes, "device_name": r.device_name,
                 "device_total_bytes": r.device_total_bytes,
                 "device_free_bytes": r.device_free_bytes,
                 "device_used_bytes": r.device_used_bytes,
                 "gpu_utilization": r.gpu_utilization,
                 "gpu_memory_utilization": r.gpu_memory_utilization} for r in self.ranks()]

    def ranks(self) -> list[RankInfo]:
        uptime = round(time.monotonic() - self._started_at, 3) if self._procs else 0.0
        out = []
        for rank in range(self.world_size):
            ready = self.workers.ready_ranks.get(rank) if self.ready is not None else None
            memory = {} if ready is None else dict(
                weight_bytes=ready.weight_bytes, kv_cache_bytes=ready.kv_cache_bytes,
                **self._gpu_memory(ready))
            device = "" if ready is None else ready.device
            proc = self._procs[rank] if rank < len(self._procs) else None
            if proc is None or proc.returncode is not None:
                out.append(RankInfo(rank, None, device, "exited", 0, 0.0, self._restarts))
                continue
            state = process_state(proc.pid) or "exited"
            if state == "running":
                state = "ready" if self.ready is not None else "starting"
            out.append(RankInfo(rank, proc.pid, device, state, rss_bytes(proc.pid), uptime,
                                self._restarts, **memory))
        return out

    def gpus(self) -> list[RankGpu]:
        """Each ready CUDA rank's GPU now (for /metrics); none on a CPU."""
        ready = self.workers.ready_ranks if self.ready is not None else {}
        return [gpu for rank in sorted(ready) if (gpu := self._read_gpu(ready[rank]))]

    def _read_gpu(self, ready: Ready) -> RankGpu | None:
        nvml = self.devices.nvml if self.devices is not None else None
        if nvml is None or not ready.device_uuid:
            return None
        return self._gpus.read(nvml, ready.rank, ready.device_uuid)

    def _gpu_memory(self, ready: Ready) -> dict:
        """The rank's GPU as NVML sees it now; nothing on a CPU, or when NVML fails."""
        gpu = self._read_gpu(ready)
        if gpu is None:
            return {}
        busy = gpu.utilization
        return {"device_name": gpu.name, "device_total_bytes": gpu.total_bytes,
                "device_free_bytes": gpu.free_bytes, "device_used_bytes": gpu.used_bytes,
                "gpu_utilization": None if busy is None else busy.gpu,
                "gpu_memory_utilization": None if busy is None else busy.memory}
