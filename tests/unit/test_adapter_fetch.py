"""Fetching adapters through the engine (fake workers, real sources with fake remotes): slow
downloads delay nobody else, a wrong token fails only its own request, the disk cache keeps
to its cap."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraxd.adapters.sources import AdapterSources
from loraxd.config.tree import WorkerConfig
from loraxd.engine.engine import AsyncEngine
from loraxd.engine.request import AdapterError, AdapterRef, FinishEvent, GenerationRequest
from loraxd.protocol.worker import Ready
from tests.unit.fakes import FakeWorkerSocket
from tests.unit.test_adapter_sources import FakeHub, cache_adapter, hub, make_adapter  # noqa: F401

SHA = "a" * 40


class Tokenizer:
    special_ids = frozenset({0})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i)


Workers = FakeWorkerSocket  # every step: an 'x' per sequence; every adapter load succeeds


def config(**adapters):
    return SimpleNamespace(
        model=SimpleNamespace(model_id="m", num_shard=1),
        scheduler=SimpleNamespace(max_batch_prefill_tokens=64, waiting_served_ratio=0.0,
                                  max_waiting_tokens=20, max_concurrent_requests=64,
                                  max_best_of=2, max_stop_sequences=4, max_input_length=32,
                                  max_total_tokens=64, max_batch_total_tokens=1024,
                                  prefill_chunk_tokens=0, prefix_caching=True),
        adapters=SimpleNamespace(**{
            "max_active_adapters": 2, "adapter_cycle_time_s": 1.0, "adapter_source": "hub",
            "preloaded_adapter_ids": (), "max_adapter_downloads": 2,
            "adapter_fetch_timeout_s": 30.0, **adapters}),
        worker=WorkerConfig())


async def start_engine(sources, **adapters) -> AsyncEngine:
    ready = Ready(0, 64, 4, 128, [0], 64, "float32", "cpu", "LlamaForCausalLM")
    engine = AsyncEngine(config(**adapters), Tokenizer(), Workers(), ready, recover=None,
                         sources=sources)
    engine.start()
    return engine


@pytest.fixture
async def engines():
    started = []

    async def make(sources, **adapters):
        started.append(await start_engine(sources, **adapters))
        return started[-1]

    yield make
    for engine in started:
        await engine.stop()


async def generate(engine, adapter_id, source="hub", token=None, timeout=10.0):
    req = GenerationRequest([ord("a")], max_new_tokens=2,
                            adapter=AdapterRef(adapter_id, source, token))

    async def run():
        return [e async for e in engine.generate(req)]
    events = await asyncio.wait_for(run(), timeout)
    assert isinstance(events[-1], FinishEvent)
    return events


class Remote:
    """`snapshot_download` stand-in: the hub cache first, then a 'download' that may wait for
    `gate` and serves the tokens in `allowed` (None: anonymous)."""

    def __init__(self, monkeypatch, hub_cache: Path, allowed=frozenset({None}), gate=None):
        import huggingface_hub
        self.hub_cache, self.allowed, self.gate = hub_cache, allowed, gate
        self.downloads: list[tuple[str, str | None]] = []
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self)

    def __call__(self, repo_id, *, token, cache_dir, local_files_only, allow_patterns):
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        from tests.unit.test_adapter_sources import hub_error
        snapshot = self.hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SHA
        if local_files_only:
            if (snapshot / "adapter_config.json").is_file():
                return str(snapshot)
            raise LocalEntryNotFoundError("not cached")
        self.downloads.append((repo_id, token))
        if self.gate is not None:
            assert self.gate.wait(30)
        if token not in self.allowed:
            raise hub_error(404, RepositoryNotFoundError)
        return str(cache_adapter(self.hub_cache, repo_id, SHA))


# -- slow downloads --------------------------------------------------------------------------


async def test_slow_downloads_do_not_delay_another_adapter(tmp_path, hub, monkeypatch, engines):
    """Eight downloads hang; a local adapter's request (fetch and authorization) is served
    at once meanwhile."""
    make_adapter(tmp_path / "local" / "fast")
    gate = threading.Event()
    Remote(monkeypatch, hub, gate=gate)
    sources = AdapterSources(local_adapter_dirs=(str(tmp_path / "local"),),
                             cache_dir=str(tmp_path / "cache"), hub_cache=str(hub))
    engine = await engines(sources)
    slow = [asyncio.create_task(generate(engine, f"ns/slow-{i}", timeout=60)) for i in range(8)]
    try:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await generate(engine, "fast", "local", timeout=5)
        await generate(engine, "fast", "local", timeout=5)
        assert time.monotonic() - started < 2
        assert not any(task.done() for task in slow)
    finally:
        gate.set()
    await asyncio.gather(*slow)


async def test_a_download_past_its_timeout_fails_its_requests(tmp_path, hub, monkeypatch,
                                                              engines):
    gate = threading.Event()
    Remote(monkeypatch, hub, gate=gate)
    sources = AdapterSources(local_adapter_dirs=(), cache_dir=str(tmp_path / "cache"),
                             hub_cache=str(hub))
    engine = await engines(sources, adapter_fetch_timeout_s=0.5)
    try:
        with pytest.raises(AdapterError, match=r"longer than adapter_fetch_timeout_s \(0.5 s\)"):
            await generate(engine, "ns/stuck")
    finally:
        gate.set()


# -- tokens ----------------------------------------------------------------------------------


async def test_two_tokens_for_one_private_adapter_at_once(tmp_path, hub, monkeypatch, engines):
    """A wrong token's download fails; the right token's request, which arrived while that
    download ran, is served with its own token."""
    gate = threading.Event()
    remote = Remote(monkeypatch, hub, allowed={"good"}, gate=gate)
    FakeHub(monkeypatch, {"ns/private": {"good"}})
    sources = AdapterSources(local_adapter_dirs=(), cache_dir=str(tmp_path / "cache"),
                             hub_cache=str(hub))
    engine = await engines(sources)
    bad = asyncio.create_task(generate(engine, "ns/private", token="bad"))
    await asyncio.sleep(0.2)
    good = asyncio.create_task(generate(engine, "ns/private", token="good"))
    await asyncio.sleep(0.2)
    gate.set()
    with pytest.raises(AdapterError, match="not found on the hub, or it is private"):
        await bad
    await good
    assert remote.downloads == [("ns/private", "bad"), ("ns/private", "good")]
    with pytest.raises(AdapterError, match="private and this request's token is not authorised"):
        await generate(engine, "ns/private", token="bad")
    await generate(engine, "ns/private", token="good")


# -- the disk cache ----------------------------------------------------------------------------


async def test_disk_cache_cap_evicts_least_recently_used(tmp_path, hub, monkeypatch, engines):
    """Room for three downloads: the fourth evicts the least recently used idle one, never the
    pinned one; an evicted adapter asked for again is downloaded again."""
    remote = Remote(monkeypatch, hub)
    entry = cache_adapter(tmp_path / "probe", "ns/x", SHA).parents[1]
    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    sources = AdapterSources(local_adapter_dirs=(), cache_dir=str(tmp_path / "cache"),
                             hub_cache=str(hub), cache_bytes=3 * size)
    engine = await engines(sources, preloaded_adapter_ids=("ns/pinned",))
    await generate(engine, "ns/pinned")
    for name in ("ns/a", "ns/b", "ns/c"):  # one slot rotates: a, then b, then c
        await generate(engine, name)
    repos = {name: hub / f"models--ns--{name}" for name in ("pinned", "a", "b", "c")}
    assert not repos["a"].exists()
    assert repos["pinned"].exists() and repos["b"].exists() and repos["c"].exists()
    assert sources.disk_cache.num_bytes <= 3 * size
    await generate(engine, "ns/a")
    assert [d for d in remote.downloads if d[0] == "ns/a"] == [("ns/a", None)] * 2
    assert repos["a"].exists() and repos["pinned"].exists()
