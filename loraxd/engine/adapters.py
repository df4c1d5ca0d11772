"""Which adapter sits in which device slot, and when each one moves.

An adapter's life: fetching (download to disk, in a thread) → fetched, waiting for a slot
→ loading (the workers read it into host memory and copy it into the slot) → loaded. The
scheduler asks `acquire()` for each waiting request: a slot when the adapter is loaded,
None otherwise, so a request whose adapter is still on its way never holds up the others.

With more adapters wanted than slots, slots rotate: an adapter loaded for longer than
`adapter_cycle_time_s` takes no new requests while others wait for a slot; once its running
requests finish, its slot goes to the adapter that has waited longest. Preloaded adapters
are pinned and never rotate out.

An adapter that was loading each of the last two times the workers died is quarantined:
its requests get the reason instead of another load that may kill the next worker, until
`loraxctl adapters unload` lifts it (say, once its files were replaced). After one such
death an adapter is a suspect, and loads alone: a second death is then its own, and an
adapter that merely loaded beside it is not blamed twice.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator

from loraxd.engine.request import AdapterRef, MergedAdapters
from loraxd.engine.sequence import Sequence

log = logging.getLogger(__name__)

FETCHING, FETCHED, LOADING, LOADED = "fetching", "fetched", "loading", "loaded"
QUARANTINED = "quarantined"
_MAX_FETCH_TRIES = 8  # one per other request's token the hub refused
_STRIKES = 2  # worker deaths in a row during its load that quarantine an adapter


AdapterSpec = AdapterRef | MergedAdapters


def adapter_key(spec: AdapterSpec) -> str:
    """Identity of what sits in a slot: (source, id), or the whole merge recipe."""
    if isinstance(spec, MergedAdapters):
        parts = ",".join(f"{i}*{w!r}" for i, w in zip(spec.ids, spec.weights))
        return (f"merge:{spec.source}:{spec.merge_strategy}:{spec.density!r}:"
                f"{spec.majority_sign_method}:{parts}")
    return f"{spec.source}:{spec.adapter_id}"


@dataclass(eq=False)
class AdapterEntry:
    key: str
    ref: AdapterSpec
    status: str = FETCHING
    path: Path | list[Path] | None = None  # a list for a merge
    slot: int = -1
    num_running: int = 0
    num_waiting: int = 0  # queued requests that want it: a loaded adapter they wait for stays
    loaded_at: float = 0.0
    last_used: float = 0.0
    pinned: bool = False
    fetched: asyncio.Future | None = None  # resolves once the files are on disk
    strikes: int = 0  # worker deaths in a row while it was loading
    error: str | None = None  # why it is quarantined
    moved_at: float = 0.0  # when its fetch or its load started
    load_number: int = 0  # which load of the manager put it in its slot (see kv_identity)


class AdapterManager:
    def __init__(self, *, num_slots: int, cycle_time_s: float,
                 fetch: Callable[[AdapterSpec], Awaitable[Path | list[Path]]],
                 load: Callable[[int, AdapterEntry], Awaitable[None]],
                 on_failed: Callable[[str, str], None], wake: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.num_slots = num_slots
        self.cycle_time_s = cycle_time_s
        self._fetch = fetch
        self._load = load
        self._on_failed = on_failed
        self._wake = wake
        self._clock = clock
        self.entries: dict[str, AdapterEntry] = {}
        self.slots: list[str | None] = [None] * num_slots
        self.pending: OrderedDict[str, None] = OrderedDict()  # fetched, waiting for a slot
        self._tasks: set[asyncio.Task] = set()
        self._loads = 0
        # Called with ("fetch" | "load", entry, seconds) as each fetch or load succeeds.
        self.timing_observers: list[Callable[[str, AdapterEntry, float], None]] = []

    # -- the scheduler's side ----------------------------------------------------------------

    def acquire(self, seq: Sequence) -> int | None:
        ref = seq.request.adapter_spec
        if ref is None:
            return -1
        entry = self.entries.get(adapter_key(ref))
        if entry is None:
            self._start_fetch(ref)
            return None
        if entry.status == QUARANTINED:  # after the admission pass: it removes the waiting
            asyncio.get_running_loop().call_soon(self._on_failed, entry.key,
                                                 f"quarantined: {entry.error}")
            return None
        if entry.status == FETCHED and entry.key not in self.pending:
            self.pending[entry.key] = None
            self._assign_slots()
        if entry.status != LOADED or self._draining(entry):
            return None
        entry.num_running += 1
        entry.last_used = self._clock()
        return entry.slot

    def enqueue(self, seq: Sequence) -> None:
        entry = self._entry_of(seq)
        if entry is not None:
            entry.num_waiting += 1

    def dequeue(self, seq: Sequence) -> None:
        entry = self._entry_of(seq)
        if entry is not None:
            entry.num_waiting -= 1

    def kv_identity(self, seq: Sequence) -> object:
        """A load of an adapter computes K/V only the same load computes: another load of the
        same id may have read other files."""
        entry = self._entry_of(seq)
        return "base" if entry is None else (entry.key, entry.load_number)

    def _entry_of(self, seq: Sequence) -> AdapterEntry | None:
        spec = seq.request.adapter_spec
        return self.entries.get(adapter_key(spec)) if spec is not None else None

    def release(self, seq: Sequence) -> None:
        ref = seq.request.adapter_spec
        entry = self.entries.get(adapter_key(ref)) if ref is not None else None
        if entry is None or entry.status != LOADED:
            return
        entry.num_running -= 1
        if entry.num_running == 0 and self.pending:
            self._assign_slots()

    def _draining(self, entry: AdapterEntry) -> bool:
        """Refuse new requests so the slot frees up, when others have waited their turn."""
        return (bool(self.pending) and not entry.pinned and self._free_slot() is None
                and self._clock() - entry.loaded_at >= self.cycle_time_s)

    # -- moving adapters ---------------------------------------------------------------------

    def preload(self, ref: AdapterSpec, *, pin: bool = True) -> AdapterEntry:
        """Fetch and load; pinned, the adapter stays in its slot from then on."""
        entry = self.entries.get(adapter_key(ref)) or self._start_fetch(ref)
        entry.pinned = entry.pinned or pin
        if entry.status == FETCHED and entry.key not in self.pending:
            self.pending[entry.key] = None
            self._assign_slots()
        return entry

    def unpin(self, key: str) -> AdapterEntry:
        """The adapter rotates out of its slot like any other; KeyError when unknown."""
        entry = self.entries[key]
        entry.pinned = False
        if self.pending:
            self._assign_slots()
        return entry

    def unload(self, key: str) -> None:
        """Forget the adapter and free its slot for the next waiting one. KeyError when
        unknown; ValueError (why) while requests use or wait for it, or while it moves."""
        entry = self.entries[key]
        if entry.status == QUARANTINED:
            del self.entries[key]
            log.info("adapter %s is no longer quarantined", key)
            return
        if entry.num_running or entry.num_waiting:
            raise ValueError(f"{entry.num_running} running and {entry.num_waiting} waiting "
                             "requests use it")
        if entry.status in (FETCHING, LOADING):
            raise ValueError(f"it is {entry.status}; try again once it is done")
        self.pending.pop(key, None)
        if entry.slot >= 0:
            self.slots[entry.slot] = None
        del self.entries[key]
        log.info("adapter %s unloaded", key)
        self._assign_slots()

    async def ensure_fetched(self, ref: AdapterSpec) -> None:
        """Wait until the adapter's files are on disk; raises the fetch's error. A fetch
        that failed because the source refused another request's token (`denied`) is tried
        again with this request's own: a wrong token fails only its own request."""
        for attempt in range(1, _MAX_FETCH_TRIES + 1):
            entry = self.entries.get(adapter_key(ref)) or self._start_fetch(ref)
            if entry.status == QUARANTINED:
                raise AdapterQuarantined(entry.key, entry.error)
            try:
                await asyncio.shield(entry.fetched)
                return
            except Exception as exc:
                others = getattr(exc, "denied", False) and _token(entry.ref) != _token(ref)
                if not others or attempt == _MAX_FETCH_TRIES:
                    raise

    def _start_fetch(self, ref: AdapterSpec) -> AdapterEntry:
        entry = AdapterEntry(adapter_key(ref), ref)
        entry.fetched = asyncio.get_running_loop().create_future()
        self.entries[entry.key] = entry
        self._spawn(self._fetch_then_queue(entry))
        return entry

    async def _fetch_then_queue(self, entry: AdapterEntry) -> None:
        entry.moved_at = self._clock()
        try:
            entry.path = await self._fetch(entry.ref)
        except Exception as exc:  # noqa: BLE001 - reported to every request for it
            entry.fetched.set_exception(exc)
            entry.fetched.exception()  # retrieved: waiters may all be gone
            self._failed(entry, str(exc))
            return
        entry.fetched.set_result(None)
        self._timed("fetch", entry)
        entry.status = FETCHED
        self.pending[entry.key] = None
        self._assign_slots()

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used idle one. An idle adapter that
        requests still wait for keeps its slot until it has had its cycle, so a fresh load
        is never evicted before its requests run."""
        idle = []
        now = self._clock()
        for slot, key in enumerate(self.slots):
            if key is None:
                return slot
            entry = self.entries[key]
            if entry.status != LOADED or entry.num_running or entry.pinned:
                continue
            if entry.num_waiting == 0:
                idle.append((0, entry.last_used, slot))
            elif now - entry.loaded_at >= self.cycle_time_s:
                idle.append((1, entry.last_used, slot))
        return min(idle)[2] if idle else None

    def _assign_slots(self) -> None:
        while self.pending and not self._suspect_loading():
            head = self.entries[next(iter(self.pending))]
            if head.strikes and any(e.status == LOADING for e in self.entries.values()):
                return  # a suspect loads alone, so that a death during its load is its own
            slot = self._free_slot()
            if slot is None:
                return
            key, _ = self.pending.popitem(last=False)
            evicted = self.slots[slot]
            if evicted is not None:
                old = self.entries[evicted]
                old.status, old.slot = FETCHED, -1
                log.info("adapter %s leaves slot %d for %s", evicted, slot, key)
            entry = self.entries[key]
            entry.status, entry.slot, entry.moved_at = LOADING, slot, self._clock()
            self.slots[slot] = key
            self._spawn(self._load(slot, entry))

    def _suspect_loading(self) -> bool:
        return any(e.status == LOADING and e.strikes for e in self.entries.values())

    def on_loaded(self, slot: int, key: str, error: str | None) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.slot != slot or entry.status != LOADING:
            return
        if error is not None:
            self.slots[slot] = None
            self._failed(entry, error)
            self._assign_slots()
            return
        entry.status, entry.strikes = LOADED, 0
        self._loads += 1
        entry.load_number = self._loads
        entry.loaded_at = entry.last_used = self._clock()
        self._timed("load", entry)
        log.info("adapter %s loaded into slot %d", key, slot)
        if self.pending:
            self._assign_slots()
        self._wake()

    def unsent(self, slot: int, key: str) -> None:
        """The load never reached the workers (they are being replaced): the adapter waits
        for a slot again, with no strike against it."""
        entry = self.entries.get(key)
        if entry is None or entry.slot != slot or entry.status != LOADING:
            return
        self.slots[slot] = None
        entry.status, entry.slot = FETCHED, -1
        self.pending[key] = None

    def _failed(self, entry: AdapterEntry, error: str) -> None:
        log.warning("adapter %s failed: %s", entry.key, error)
        self.entries.pop(entry.key, None)  # a later request tries again
        self.pending.pop(entry.key, None)
        self._on_failed(entry.key, error)
        self._wake()

    def _timed(self, stage: str, entry: AdapterEntry) -> None:
        for observe in self.timing_observers:
            observe(stage, entry, self._clock() - entry.moved_at)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset_slots(self, queue: Iterable[Sequence] = ()) -> None:
        """The workers restarted with empty slots: everything must load again, except an
        adapter whose load was under way at this death and the one before (quarantined).

        The slots go first to the adapters `queue` (the waiting requests, resumed ones at
        its head) wants, in its order: releasing the resumed requests let adapters that
        only queued requests wanted take their slots, and a resumed stream would otherwise
        stall for a whole rotation behind requests that arrived after it."""
        for entry in self.entries.values():
            entry.num_running = 0
            if entry.status == LOADING:
                entry.strikes += 1
                if entry.strikes >= _STRIKES:
                    self._quarantine(entry)
                    continue
            if entry.status in (LOADED, LOADING):
                entry.status, entry.slot = FETCHED, -1
                self.pending[entry.key] = None
        wanted = dict.fromkeys(e.key for e in map(self._entry_of, queue)
                               if e is not None and e.status == FETCHED)
        for key in reversed(wanted):
            self.pending[key] = None
            self.pending.move_to_end(key, last=False)
        self.slots = [None] * self.num_slots
        self._assign_slots()

    def _quarantine(self, entry: AdapterEntry) -> None:
        entry.status, entry.slot = QUARANTINED, -1
        entry.error = f"the workers died while loading it {entry.strikes} times in a row"
        log.error("adapter %s is quarantined: %s; `loraxctl adapters unload` lifts it",
                  entry.key, entry.error)
        self.pending.pop(entry.key, None)
        self._on_failed(entry.key, f"quarantined: {entry.error}")

    # -- the disk cache's side ----------------------------------------------------------------

    def _idle(self, entry: AdapterEntry) -> bool:
        """On disk and wanted by nobody: its files may go (a later request fetches again)."""
        return (entry.status == FETCHED and entry.key not in self.pending and not entry.pinned
                and entry.num_waiting == 0 and entry.num_running == 0)

    def busy_refs(self) -> Iterator[AdapterRef]:
        """The adapters whose files must stay: fetching, waiting for a slot, loading, loaded."""
        for entry in self.entries.values():
            if not self._idle(entry):
                yield from _refs(entry.ref)

    def forget_idle(self, gone: Callable[[AdapterRef], bool]) -> None:
        """Drop the idle entries of adapters whose files were deleted."""
        for key, entry in list(self.entries.items()):
            if self._idle(entry) and any(gone(ref) for ref in _refs(entry.ref)):
                del self.entries[key]

    # -- read-outs ---------------------------------------------------------------------------

    def running_adapters(self) -> list[str]:
        return [k for k in self.slots if k is not None and self.entries[k].num_running > 0]

    def waiting_adapters(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.status not in (LOADED, QUARANTINED)]


class AdapterQuarantined(Exception):
    def __init__(self, key: str, why: str | None):
        super().__init__(f"adapter {key} is quarantined: {why}")


def _refs(spec: AdapterSpec) -> tuple[AdapterRef, ...]:
    return spec.components if isinstance(spec, MergedAdapters) else (spec,)


def _token(spec: AdapterSpec) -> str | None:
    return spec.api_token or None
