"""Adapter files for the engine: lookups, downloads and token checks, each in its own pool.

A lookup (a local adapter, a cached download) needs no network and runs at once; downloads
(hub, S3) run at most `max_downloads` at a time and fail after `timeout_s`; token checks
have their own threads. So a slow download never delays another adapter's request, nor any
request's authorization. After each fetch the disk cache is brought back under its cap, on
the event loop, so that no adapter can become busy between the choice and the eviction.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path

from loraxd.adapters.errors import AdapterFetchError
from loraxd.engine.request import AdapterRef
from loraxd.engine.thread_pool import DaemonThreadPool

_LOOKUP_THREADS = 4
_CHECK_THREADS = 4


class AdapterFetcher:
    def __init__(self, sources, *, max_downloads: int, timeout_s: float,
                 busy: Callable[[], Iterable[AdapterRef]],
                 forget: Callable[[Callable[[AdapterRef], bool]], None]):
        self.sources = sources  # loraxd.adapters.sources.AdapterSources
        self.timeout_s = timeout_s
        self._busy = busy  # adapters whose files must stay
        self._forget = forget  # drop idle adapters whose files are gone
        self._lookups = DaemonThreadPool(_LOOKUP_THREADS, "adapter-lookup")
        self._downloads = DaemonThreadPool(max_downloads, "adapter-download")
        self._checks = DaemonThreadPool(_CHECK_THREADS, "adapter-check")
        self._fetching: dict[str, int] = {}  # disk-cache entries of fetches in flight

    async def fetch(self, ref: AdapterRef) -> Path:
        entry = self._entry(ref)
        self._fetching[entry] = self._fetching.get(entry, 0) + 1
        try:
            path = await self._run(self._lookups, self.sources.lookup, ref)
            if path is None:
                try:
                    path = await asyncio.wait_for(
                        self._run(self._downloads, self.sources.fetch, ref), self.timeout_s)
                except TimeoutError:
                    raise AdapterFetchError(ref.source, ref.adapter_id, (
                        f"the download took longer than adapter_fetch_timeout_s "
                        f"({self.timeout_s:g} s)")) from None
            self._evict()
            return path
        finally:
            self._fetching[entry] -= 1
            if not self._fetching[entry]:
                del self._fetching[entry]

    async def authorize(self, ref: AdapterRef) -> None:
        await self._run(self._checks, self.sources.authorize, ref)

    def close(self) -> None:
        for pool in (self._lookups, self._downloads, self._checks):
            pool.shutdown(wait=False, cancel_futures=True)

    def _evict(self) -> None:
        busy = {self._entry(ref) for ref in self._busy()} | set(self._fetching)
        evicted = set(self.sources.disk_cache.evict(busy))
        if evicted:
            self._forget(lambda ref: self._entry(ref) in evicted)
            self._lookups.submit(self.sources.disk_cache.purge)

    def _entry(self, ref: AdapterRef) -> str:
        entry = self.sources.cache_entry(ref.source, ref.adapter_id)
        return "" if entry is None else str(entry)

    @staticmethod
    def _run(pool, fn, ref: AdapterRef):
        return asyncio.get_running_loop().run_in_executor(
            pool, fn, ref.source, ref.adapter_id, ref.api_token)
