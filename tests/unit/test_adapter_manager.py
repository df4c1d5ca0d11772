"""Adapter slot management, driven with fake fetch/load and a fake clock."""
from __future__ import annotations

import asyncio
from pathlib import Path

from loraxd.engine.adapters import AdapterManager, adapter_key
from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.request import AdapterRef, GenerationRequest
from loraxd.engine.sequence import Sequence


class Harness:
    def __init__(self, num_slots=2, cycle=1.0, fail=()):
        self.now = 0.0
        self.loads: list[tuple[int, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.fail = set(fail)
        self.dead = False  # the workers are gone: a load never reaches them
        self.m = AdapterManager(num_slots=num_slots, cycle_time_s=cycle, fetch=self.fetch,
                                load=self.load, on_failed=lambda k, e: self.failed.append((k, e)),
                                wake=lambda: None, clock=lambda: self.now)

    async def fetch(self, ref):
        if ref.adapter_id in self.fail:
            raise RuntimeError("no such adapter")
        return Path("/adapters") / ref.adapter_id

    async def load(self, slot, entry):
        if self.dead:
            self.m.unsent(slot, entry.key)
            return
        self.loads.append((slot, entry.key))
        self.m.on_loaded(slot, entry.key, None)


def seq(adapter: str | None, req_id=1):
    ref = AdapterRef(adapter, "local") if adapter else None
    return Sequence(req_id, GenerationRequest([1], 4, adapter=ref),
                    IncrementalDetokenizer(None, [], frozenset()))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_base_requests_need_no_slot():
    h = Harness()
    assert h.m.acquire(seq(None)) == -1


async def test_fetch_load_then_acquire():
    h = Harness()
    s = seq("a")
    assert h.m.acquire(s) is None  # starts the fetch
    await settle()
    assert h.loads == [(0, "local:a")]
    assert h.m.acquire(s) == 0
    assert h.m.running_adapters() == ["local:a"]
    h.m.release(s)
    assert h.m.running_adapters() == []


async def test_failure_is_reported_and_retried_later():
    h = Harness(fail={"bad"})
    assert h.m.acquire(seq("bad")) is None
    await settle()
    assert h.failed and h.failed[0][0] == "local:bad" and "no such adapter" in h.failed[0][1]
    assert "local:bad" not in h.m.entries


async def test_lru_idle_slot_is_reused():
    h = Harness(num_slots=2)
    for name in "abc":
        s = seq(name)
        h.m.acquire(s)
        await settle()
        h.now += 1
        assert h.m.acquire(s) is not None
        h.m.release(s)
    # c took the slot of a (least recently used)
    assert h.loads == [(0, "local:a"), (1, "local:b"), (0, "local:c")]


async def test_busy_slots_rotate_after_cycle_time_and_nobody_starves():
    h = Harness(num_slots=1, cycle=1.0)
    a1 = seq("a", 1)
    h.m.acquire(a1)
    await settle()
    assert h.m.acquire(a1) == 0  # a is running
    b = seq("b", 2)
    assert h.m.acquire(b) is None
    await settle()
    assert h.m.acquire(seq("a", 3)) == 0  # within the cycle time a still takes requests
    h.m.release(seq("a", 3))
    h.now = 2.0
    assert h.m.acquire(seq("a", 4)) is None  # b has waited a cycle: a drains
    h.m.release(a1)  # a's last request ends: b gets the slot
    await settle()
    assert h.loads[-1] == (0, "local:b")
    assert h.m.acquire(b) == 0
    assert h.m.acquire(seq("a", 5)) is None  # a waits its turn now


async def test_pinned_adapters_never_rotate_out():
    h = Harness(num_slots=1, cycle=0.0)
    h.m.preload(AdapterRef("p", "local"))
    await settle()
    assert h.m.entries[adapter_key(AdapterRef("p", "local"))].slot == 0
    assert h.m.acquire(seq("q")) is None
    await settle()
    h.now = 10
    assert h.m.acquire(seq("p")) == 0
    assert h.m.entries["local:q"].status == "fetched"


async def test_a_fresh_load_is_not_evicted_before_its_waiting_requests_run():
    h = Harness(num_slots=1, cycle=1.0)
    a, b = seq("a", 1), seq("b", 2)
    h.m.acquire(a)
    await settle()
    h.m.enqueue(a)  # a's request waits in the queue; a is loaded but idle
    assert h.m.acquire(b) is None  # b wants the only slot
    await settle()
    assert h.loads == [(0, "local:a")]  # a keeps it: its request has not run yet
    h.m.dequeue(a)
    assert h.m.acquire(a) == 0
    h.m.release(a)  # done, nobody waits for a: b gets the slot
    await settle()
    assert h.loads[-1] == (0, "local:b")


async def test_preload_of_a_known_adapter_pins_it_in_place():
    h = Harness(num_slots=2)
    s = seq("a")
    h.m.acquire(s)
    await settle()
    entry = h.m.entries["local:a"]
    h.m.preload(AdapterRef("a", "local"))
    assert h.m.entries["local:a"] is entry and entry.pinned and entry.slot == 0
    assert h.loads == [(0, "local:a")]


class HangingLoads(Harness):
    """Loads that never answer: the workers die while they are under way."""

    def __init__(self, hang=("bad",)):
        super().__init__(num_slots=2)
        self.hang = set(hang)

    async def load(self, slot, entry):
        self.loads.append((slot, entry.key))
        if entry.ref.adapter_id not in self.hang:
            self.m.on_loaded(slot, entry.key, None)


async def test_an_adapter_loading_at_two_deaths_in_a_row_is_quarantined():
    h = HangingLoads()
    bad, good = seq("bad", 1), seq("good", 2)
    for s in (bad, good):
        h.m.enqueue(s)
        h.m.acquire(s)
    await settle()
    assert h.m.entries["local:bad"].status == "loading"
    h.m.reset_slots()  # the workers died once while it loaded: it loads again
    await settle()
    assert h.m.entries["local:bad"].status == "loading" and not h.failed
    assert [key for _, key in h.loads].count("local:bad") == 2
    h.m.reset_slots()  # twice in a row: quarantined, its requests told why
    await settle()
    entry = h.m.entries["local:bad"]
    assert entry.status == "quarantined" and entry.slot == -1
    assert h.failed == [("local:bad", "quarantined: the workers died while loading it 2 "
                                      "times in a row")]
    assert h.m.entries["local:good"].status == "loaded"  # loaded fine both times: unharmed
    assert h.m.acquire(seq("bad", 3)) is None  # a later request is refused, not loaded
    await settle()
    assert h.failed[-1][0] == "local:bad"
    assert [key for _, key in h.loads].count("local:bad") == 2
    try:
        await h.m.ensure_fetched(AdapterRef("bad", "local"))
    except Exception as exc:  # noqa: BLE001 - the HTTP layer turns this into a 424
        assert "quarantined: the workers died" in str(exc)
    else:
        raise AssertionError("a quarantined adapter was fetched")
    h.m.unload("local:bad")  # the operator lifts it
    assert "local:bad" not in h.m.entries


async def test_a_load_that_succeeds_clears_the_strikes():
    h = HangingLoads(hang=())
    s = seq("a")
    h.m.acquire(s)
    await settle()
    entry = h.m.entries["local:a"]
    entry.status = "loading"  # as if its load were under way at a death
    h.m.reset_slots()
    await settle()
    assert entry.strikes == 0 and entry.status == "loaded"


async def test_a_suspect_loads_alone_so_a_bystander_is_not_blamed_twice():
    h = HangingLoads(hang=("bad", "slow"))
    for i, name in enumerate(("bad", "slow"), 1):
        s = seq(name, i)
        h.m.enqueue(s)
        h.m.acquire(s)
    await settle()
    h.m.reset_slots()  # both were loading: both suspects now
    await settle()
    loading = [k for k, e in h.m.entries.items() if e.status == "loading"]
    assert len(loading) == 1  # one suspect at a time
    h.m.reset_slots()  # the second death is the lone loader's
    await settle()
    states = {k: e.status for k, e in h.m.entries.items()}
    assert sorted(states.values()) == ["loading", "quarantined"]


async def test_after_a_replacement_the_resumed_requests_adapters_load_first():
    """The workers died while a and b ran and c and d waited. Releasing a's and b's requests
    (the scheduler's requeue) hands their slots to c and d, loads that never reach the dead
    workers; the new workers must still load a and b first, for the resumed requests at the
    head of the queue, not leave them a rotation behind c and d."""
    h = Harness(num_slots=2)
    running, waiting = [seq("a", 1), seq("b", 2)], [seq("c", 3), seq("d", 4)]
    for s in running:
        h.m.acquire(s)
        await settle()
        assert h.m.acquire(s) is not None
    for s in waiting:
        h.m.enqueue(s)
        assert h.m.acquire(s) is None
    await settle()
    h.dead = True
    for s in running:
        h.m.release(s)
    for s in running:
        h.m.enqueue(s)
    await settle()
    h.dead, h.loads = False, []
    h.m.reset_slots(running + waiting)
    await settle()
    assert h.loads == [(0, "local:a"), (1, "local:b")]
