"""A size cap on downloaded adapters (hub and S3): beyond it the least recently used go.

An entry is a directory a source downloaded an adapter into: an S3 cache entry, or a hub
repository's folder (`models--ns--name`, its blobs included) fetched as an adapter; nothing
else of a shared hub cache is ever touched. The index (directory -> last use) is kept on
disk so that the order and the cap survive a restart.

Never evicted: an entry a fetch is using (`hold`), and whatever the caller says is in use
(adapters being read, loaded, waited for). An evicted entry is first renamed away, which is
atomic, so a concurrent lookup finds it whole or not at all; `purge` deletes it later.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_TRASH_PREFIX = ".evicted-"


class DiskCache:
    """Thread-safe: fetch threads hold and record entries, the engine's loop evicts."""

    def __init__(self, budget_bytes: int | None, index_path: Path,
                 clock: Callable[[], float] = time.time):
        self.budget_bytes = budget_bytes
        self.index_path = index_path
        self._clock = clock
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()  # the index is written with the latest state
        self._used: dict[str, float] = {}  # directory -> last use
        self._sizes: dict[str, int] = {}
        self._holds: dict[str, int] = {}
        self._trash: list[Path] = []
        self._load()

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    @contextmanager
    def hold(self, directory: Path) -> Iterator[None]:
        """While a fetch looks up, downloads or checks `directory`: it is not evicted."""
        key = str(directory)
        with self._lock:
            self._holds[key] = self._holds.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._holds[key] -= 1
                if not self._holds[key]:
                    del self._holds[key]

    def record(self, directory: Path) -> None:
        """`directory` was just used (downloaded or found in the cache): measure it and make
        it the most recently used."""
        size = _tree_bytes(directory)
        with self._lock:
            self._used[str(directory)] = self._clock()
            self._sizes[str(directory)] = size
        self._store()

    def evict(self, in_use: set[str]) -> list[str]:
        """Rename the least recently used entries away until the cache fits its budget;
        the directories `in_use` count as used now and stay. Returns the evicted directories
        (fast: no deletion here, see `purge`)."""
        evicted = []
        with self._lock:
            now = self._clock()
            for key in in_use & self._used.keys():
                self._used[key] = now
            total = sum(self._sizes.values())
            for key in sorted(self._used, key=self._used.get):
                if self.budget_bytes is None or total <= self.budget_bytes:
                    break
                if key in self._holds or key in in_use:
                    continue
                trash = Path(key).with_name(f"{_TRASH_PREFIX}{uuid.uuid4().hex}")
                try:
                    os.rename(key, trash)
                except FileNotFoundError:
                    pass  # deleted by hand: just forget it
                except OSError as exc:
                    log.warning("cannot evict the adapter cache entry %s: %s", key, exc)
                    continue
                else:
                    self._trash.append(trash)
                total -= self._sizes.pop(key, 0)
                del self._used[key]
                evicted.append(key)
        if evicted:
            log.info("adapter disk cache over %d bytes: evicted %s", self.budget_bytes,
                     ", ".join(evicted))
            self._store()
        return evicted

    def purge(self) -> None:
        """Delete what `evict` renamed away (blocking)."""
        with self._lock:
            trash, self._trash = self._trash, []
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)

    # -- the index on disk -------------------------------------------------------------------

    def _load(self) -> None:
        try:
            used = json.loads(self.index_path.read_text())["used"]
            items = [(str(k), float(v)) for k, v in used.items()]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("adapter disk cache index %s unreadable (%s): starting empty",
                        self.index_path, exc)
            return
        for key, when in items:
            if os.path.isdir(key):
                self._used[key] = when
                self._sizes[key] = _tree_bytes(Path(key))

    def _store(self) -> None:
        with self._store_lock:
            with self._lock:
                used = dict(self._used)
            self._write(used)

    def _write(self, used: dict[str, float]) -> None:
        tmp = None
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.index_path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"used": used}, f)
            os.replace(tmp, self.index_path)
            tmp = None
        except OSError as exc:
            log.warning("cannot write the adapter disk cache index %s: %s", self.index_path, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _tree_bytes(directory: Path) -> int:
    """Bytes of the regular files under `directory`; links are not followed (a hub snapshot
    links to the repository's blobs, which are counted once)."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            try:
                info = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total
