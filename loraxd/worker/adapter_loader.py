"""Adapters move disk → host memory → device slot off the hot path.

Reading and checking an adapter's files happens in a thread pool while steps keep running;
the main loop installs finished reads into their slots between steps (a copy of a few MB).
Adapters read recently stay in a host-memory LRU within a byte budget, so one that rotates
out of its slot comes back without touching the disk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from loraxd.protocol.worker import AdapterLoaded, AdapterMerge, LoadAdapter

log = logging.getLogger(__name__)


class HostCache:
    """An LRU of read adapters (`num_bytes` each) within `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.num_bytes = 0
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str):
        with self._lock:
            adapter = self._items.get(path)
            if adapter is not None:
                self._items.move_to_end(path)
            return adapter

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def put(self, path: str, adapter) -> None:
        size = adapter.num_bytes
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._items.pop(path, None)
            if old is not None:
                self.num_bytes -= old.num_bytes
            while self.num_bytes + size > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self.num_bytes -= evicted.num_bytes
            self._items[path] = adapter
            self.num_bytes += size


class AdapterLoader:
    """`submit` starts a read; `fileno` becomes readable when one is done; `install_ready`
    puts finished reads into their slots and returns the replies to send."""

    def __init__(self, runner, host_budget_bytes: int, max_parallel: int = 2, limits=None):
        self.runner = runner
        self.limits = limits  # an AdapterLimits for every read; its roots come with each read
        self.cache = HostCache(host_budget_bytes)
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="adapter-read")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def fileno(self) -> int:
        return self._wake_r

    def submit(self, msg: LoadAdapter) -> None:
        self._pool.submit(self._read, msg)

    def _read(self, msg: LoadAdapter) -> None:
        limits = self.limits
        if limits is not None:
            limits = dataclasses.replace(limits, roots=tuple(msg.roots))
        try:
            if msg.merge is None:
                adapter = self._cached_read(msg.path, limits)
            else:
                adapter = self.cache.get(msg.adapter_key)
                if adapter is None:
                    adapter = self._merge(msg.adapter_key, msg.merge, limits)
                    self.cache.put(msg.adapter_key, adapter)
            self._done.put((msg, adapter, None))
        except Exception as exc:  # noqa: BLE001 - reported to the requests that wanted it
            self._done.put((msg, None, f"{exc}"))
        os.write(self._wake_w, b"\0")

    def _cached_read(self, path: str, limits):
        adapter = self.cache.get(path)
        if adapter is None:
            adapter = self.runner.read_adapter(path, limits)
            self.cache.put(path, adapter)
        return adapter

    def _merge(self, key: str, merge: AdapterMerge, limits):
        from loraxd.worker.lora.merge import merge_adapters
        components = [self._cached_read(p, limits) for p in merge.paths]
        # Seeded by the recipe: a DARE merge built again is the same merge.
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return merge_adapters(components, merge.weights, merge.strategy, merge.density,
                              merge.majority_sign_method, seed=seed)

    def install_ready(self) -> list[AdapterLoaded]:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        replies = []
        while True:
            try:
                msg, adapter, error = self._done.get_nowait()
            except queue.Empty:
                return replies
            if error is None:
                try:
                    self.runner.install_adapter(msg.slot, adapter)
                except Exception as exc:  # noqa: BLE001 - e.g. rank larger than the slots
                    error = f"{exc}"
            if error is not None:
                log.warning("adapter %s: %s", msg.adapter_key, error)
            replies.append(AdapterLoaded(msg.slot, msg.adapter_key, error, self.cache.keys()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
