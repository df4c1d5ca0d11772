"""The disk cache of downloaded adapters: a size cap, least recently used out first."""
from __future__ import annotations

from pathlib import Path

from loraxd.adapters.disk_cache import DiskCache


def entry(root: Path, name: str, size: int = 100) -> Path:
    path = root / name
    (path / "blobs").mkdir(parents=True)
    (path / "blobs" / "w").write_bytes(b"x" * size)
    (path / "snapshot").mkdir()
    (path / "snapshot" / "w").symlink_to("../blobs/w")  # links are not counted twice
    return path


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 1
        return self.now


def cache_with(tmp_path, budget, names, clock=None):
    cache = DiskCache(budget, tmp_path / "index.json", clock=clock or Clock())
    dirs = {name: entry(tmp_path / "cache", name) for name in names}
    for name in names:
        cache.record(dirs[name])
    return cache, dirs


def test_least_recently_used_goes_first(tmp_path):
    cache, dirs = cache_with(tmp_path, 250, ["a", "b", "c"])
    assert cache.num_bytes == 300
    assert cache.evict(set()) == [str(dirs["a"])]
    assert not dirs["a"].exists() and dirs["b"].exists() and dirs["c"].exists()
    assert cache.num_bytes == 200
    trash = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".evicted-")]
    assert len(trash) == 1
    cache.purge()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["b", "c"]


def test_use_refreshes_an_entry(tmp_path):
    cache, dirs = cache_with(tmp_path, 250, ["a", "b", "c"])
    cache.record(dirs["a"])  # fetched again: now the most recent
    assert cache.evict(set()) == [str(dirs["b"])]


def test_in_use_and_held_entries_stay(tmp_path):
    cache, dirs = cache_with(tmp_path, 150, ["a", "b", "c"])
    with cache.hold(dirs["b"]):
        assert cache.evict({str(dirs["a"])}) == [str(dirs["c"])]
    assert dirs["a"].exists() and dirs["b"].exists()
    assert cache.evict(set()) == [str(dirs["b"])]  # a counted as used at the last eviction


def test_the_order_survives_a_restart(tmp_path):
    clock = Clock()
    _, dirs = cache_with(tmp_path, None, ["a", "b", "c"], clock)
    restarted = DiskCache(250, tmp_path / "index.json", clock=clock)
    assert restarted.num_bytes == 300
    assert restarted.evict(set()) == [str(dirs["a"])]


def test_an_entry_deleted_by_hand_is_forgotten(tmp_path):
    import shutil
    cache, dirs = cache_with(tmp_path, 150, ["a", "b"])
    shutil.rmtree(dirs["a"])
    assert cache.evict(set()) == [str(dirs["a"])]
    assert cache.num_bytes == 100 and dirs["b"].exists()
