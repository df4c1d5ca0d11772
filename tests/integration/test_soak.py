"""Soak: 64 concurrent streams over 32 adapters through 8 device slots, long prompts, stop
sequences, clients that leave at random, and the worker killed (SIGKILL) halfway.

At the end every request completed, in agreement with its prompt's reference run, or was
cut by its own client; none hung; no KV page, batch slot, held request or adapter reference
is left (read through /metrics and loraxctl); the daemon's and the workers' resident memory
stayed within a bound of their level after warm-up. The figures are printed (run with -s).

Short form, in the default run: about 40 s of load (`LORAXD_SOAK_SECONDS`, default 40).
Long form: `LORAXD_SOAK_SECONDS=1800 scripts/test -s tests/integration/test_soak.py`.

The model is a tiny random Llama (hidden 64, 2 layers) with the default model's tokenizer,
so that 2 CPU cores can keep 64 streams of 450-token prompts moving.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from loraxd.daemon.proc import rss_bytes
from tests.integration import tiny_model
from tests.integration.daemon import Daemon
from tests.integration.soak_load import (COMPLETED, CUT, Clients, Key, Reference, Spec,
                                         long_prompts, problem, stop_from)

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("LORAXD_SOAK_SECONDS", "40"))
STREAMS, ADAPTERS, SLOTS = 64, 32, 8
MAX_INPUT, MAX_TOTAL = 448, 512
MAX_NEW = MAX_TOTAL - MAX_INPUT
# A request not ended by then counts as hung. One may wait for its adapter's turn through
# a whole rotation of the slots (32 adapters in 8: four groups of 450-token requests),
# which on a shared 2-core machine has taken two minutes.
REQUEST_TIMEOUT_S = 300.0
QUIET_TIMEOUT_S = 30.0  # for the engine to let go of everything after the last client
# Resident memory may grow this much past its level after warm-up (allocator slack; a
# worker's matmuls see a bounded set of row counts, so oneDNN's per-shape state is bounded
# too): a gross leak shows here, a slow one needs the long form.
RSS_SLACK = {"daemon": (0.10, 32 << 20), "worker": (0.10, 48 << 20)}
MIB = 1 << 20


@pytest.fixture(scope="module")
def soak_model(default_model_dir, tmp_path_factory):
    """The tiny model and 32 PEFT adapters (ranks 4, 8 and 16 on every linear layer)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    adapters = [(f"a{i}", 100 + i, (4, 8, 16)[i % 3]) for i in range(ADAPTERS)]
    return tiny_model.build(default_model_dir, tmp_path_factory.mktemp("soak-model"),
                            adapters, seed=11, tied=True, max_positions=1024)


def _keys() -> list[Key]:
    """Per adapter one greedy and one seeded key, each on its own prompt; two for the base."""
    keys = [Key(0, None, None), Key(1, None, 7)]
    for i in range(ADAPTERS):
        keys += [Key(2 + 2 * i, f"a{i}", None), Key(3 + 2 * i, f"a{i}", 1000 + i)]
    return keys


def test_soak(soak_model, tmp_path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(soak_model / "model" / "tokenizer.json"))
    prompts = long_prompts(tokenizer, 2 + 2 * ADAPTERS, MAX_INPUT - 64, MAX_INPUT - 8,
                           random.Random(3))
    daemon = Daemon(soak_model / "model", tmp_path, "--adapter-source", "local",
                    "--local-adapter-dir", str(soak_model / "adapters"),
                    "--max-active-adapters", str(SLOTS), "--adapter-cycle-time-s", "1",
                    "--max-input-length", str(MAX_INPUT), "--max-total-tokens", str(MAX_TOTAL),
                    "--max-batch-total-tokens", str(STREAMS * MAX_TOTAL // 2))
    try:
        daemon.wait_ready()
        run = asyncio.run(_soak(daemon, prompts))
        run["prompt_lengths"] = [len(tokenizer.encode(p).ids) for p in prompts]
        run["workers"] = _loraxctl(daemon, "workers")["workers"]
        run["adapters"] = _loraxctl(daemon, "adapters", "list")["adapters"]
        run["requests"] = _loraxctl(daemon, "requests", "list")["requests"]
        alive = daemon.proc.poll() is None
    finally:
        daemon.stop()
    log = daemon.log_path.read_text(errors="replace")
    _print_figures(run, log)

    assert alive, daemon.log()
    outcomes, refs = run["outcomes"], run["refs"]
    problems = [f"{o.spec}: {p}" for o in outcomes if (p := problem(o, refs[o.spec.key]))]
    assert not problems, f"{len(problems)} bad requests, first ones:\n" + "\n".join(problems[:10])
    stopped = [o for o in outcomes if o.finish == "stop_sequence"]
    assert any(o.status == CUT for o in outcomes) and stopped, "the load lacks a case"
    assert run["spanned_kill"], "no stream was running across the kill"
    assert run["restarts"] == 1, f"{run['restarts']} worker restarts, not the 1 kill: {log}"
    assert re.search(r"[1-9]\d* running request\(s\) will resume", log)

    quiet = run["quiet"]  # nothing left behind once every client is gone
    leaks = {k: quiet[k] for k in ("num_requests_running", "num_requests_waiting",
                                   "num_requests_held", "num_kv_pages_used") if quiet[k]}
    leaks.update({k: quiet[k] for k in ("running_lora_adapters", "waiting_lora_adapters")
                  if quiet[k]})
    assert not leaks, f"left behind after the soak: {leaks}"
    assert run["requests"] == []
    held = [a for a in run["adapters"] if a["num_running"] or a["num_waiting"]]
    assert not held, f"adapter references left: {held}"
    assert sum(a["status"] == "loaded" for a in run["adapters"]) == SLOTS

    for name, (before, after) in run["rss"].items():
        ratio, slack = RSS_SLACK[name.split()[0]]
        bound = before * (1 + ratio) + slack
        assert after <= bound, f"{name} RSS grew from {before / MIB:.0f} MiB to " \
                               f"{after / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)"


async def _soak(daemon: Daemon, prompts: list[str]) -> dict:
    import aiohttp
    clients = Clients(daemon.url, prompts, REQUEST_TIMEOUT_S)
    rng = random.Random(5)
    # aiohttp's default pool (15 s keep-alive, shorter than the server's 75 s): as clients
    # connect by default.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        refs = await _references(session, clients)  # also a warm-up: every adapter loads
        rss = _RssSampler(daemon)
        start = time.monotonic()
        end, kill_at = start + SECONDS, start + SECONDS / 2
        outcomes: list = []

        async def client() -> None:
            while time.monotonic() < end:
                key = rng.choice(list(refs))
                max_new = rng.randint(8, MAX_NEW)
                stop = stop_from(refs[key], rng) if rng.random() < 0.4 else None
                cut_at = rng.randint(1, max_new - 1) if rng.random() < 0.2 else None
                outcomes.append(await clients.run(session, Spec(key, max_new, stop, cut_at)))

        sampler = asyncio.ensure_future(rss.run(start, kill_at, end))
        killer = asyncio.ensure_future(_kill_worker(daemon, session, clients, kill_at))
        await asyncio.gather(*(client() for _ in range(STREAMS)))
        elapsed = time.monotonic() - start
        old_pid, new_pid = await killer
        rss.stop()
        await sampler
        quiet = await _quiet_metrics(daemon, session)
    spanned = [o for o in outcomes if o.stall_s is not None]
    return {"outcomes": outcomes, "refs": refs, "elapsed": elapsed, "quiet": quiet,
            "tokens": clients.num_tokens, "spanned_kill": spanned,
            "rss": rss.figures(old_pid, new_pid), "restarts": _restarts(daemon),
            "rss_series": {n: rss.series(p) for n, p in (("daemon", None),
                           ("worker (killed)", old_pid), ("worker (new)", new_pid))}}


async def _references(session, clients: Clients) -> dict[Key, Reference]:
    """One uncut run of each key, a slotful of adapters at a time: all of a group's
    requests are there before any of its adapters rotates out."""
    keys, refs = _keys(), {}
    groups = [[k for k in keys if _group(k) == g] for g in sorted({_group(k) for k in keys})]
    for group in groups:
        outs = await asyncio.gather(*(clients.run(session, Spec(k, MAX_NEW)) for k in group))
        for out in outs:
            assert out.status == COMPLETED, f"reference run {out.spec}: {out.error}"
            refs[out.spec.key] = Reference(out.ids, out.text, out.finish)
    return refs


def _group(key: Key) -> int:
    return 0 if key.adapter is None else int(key.adapter[1:]) // SLOTS


async def _metrics(session, url: str) -> dict:
    async with session.get(url + "/metrics", headers={"Accept": "application/json"}) as r:
        assert r.status == 200
        return await r.json()


async def _kill_worker(daemon: Daemon, session, clients: Clients, at: float) -> tuple[int, int]:
    """SIGKILL the worker at `at`, while requests run; the pids of the old and new one."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    while (await _metrics(session, daemon.url))["num_requests_running"] == 0:
        assert time.monotonic() < at + REQUEST_TIMEOUT_S, "nothing runs: no stream to resume"
        await asyncio.sleep(0.05)  # mid-stream, or the kill tests no resume
    (old,) = daemon.worker_pids()
    os.kill(old, signal.SIGKILL)
    clients.kill_at = time.monotonic()
    deadline = clients.kill_at + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        new = [p for p in daemon.worker_pids() if p != old]
        if new:
            return old, new[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no new worker within {REQUEST_TIMEOUT_S:g} s:\n{daemon.log()}")


async def _quiet_metrics(daemon: Daemon, session) -> dict:
    """/metrics once the engine holds nothing, or at QUIET_TIMEOUT_S if it keeps something."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        m = await _metrics(session, daemon.url)
        busy = (m["num_requests_running"] or m["num_requests_waiting"] or m["num_requests_held"]
                or m["num_kv_pages_used"]
                or m["running_lora_adapters"] or m["waiting_lora_adapters"])
        if not busy or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.1)


class _RssSampler:
    """The daemon's and the worker's resident memory, once a second through the soak."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.samples: list[tuple[float, int, dict[int, int]]] = []
        self._done = asyncio.Event()

    def sample(self) -> None:
        workers = {p: rss_bytes(p) for p in self.daemon.worker_pids()}
        self.samples.append((time.monotonic(), rss_bytes(self.daemon.proc.pid), workers))

    async def run(self, start: float, kill_at: float, end: float) -> None:
        self.start, self.kill_at, self.end = start, kill_at, end
        while not self._done.is_set():
            self.sample()
            try:
                await asyncio.wait_for(self._done.wait(), 1.0)
            except TimeoutError:
                pass
        self.sample()

    def stop(self) -> None:
        self._done.set()

    def _at(self, t: float, pid: int | None = None) -> int:
        """The sample nearest `t` (of `pid`, or the daemon's) that has one."""
        rows = [(abs(s[0] - t), s[2].get(pid, 0) if pid else s[1]) for s in self.samples]
        return min((d, v) for d, v in rows if v)[1]

    def _last(self, pid: int | None = None) -> int:
        return self._at(self.samples[-1][0], pid)

    def series(self, pid: int | None, points: int = 9) -> str:
        """A few evenly spaced samples of the process, as 't s: MiB' (t from the start)."""
        rows = [(t, w.get(pid, 0) if pid else d) for t, d, w in self.samples]
        rows = [r for r in rows if r[1]]
        picked = [rows[round(i * (len(rows) - 1) / (points - 1))] for i in range(points)]
        return ", ".join(f"{t - self.start:.0f}s {v / MIB:.0f}" for t, v in picked)

    def figures(self, old_pid: int, new_pid: int) -> dict[str, tuple[int, int]]:
        """(after warm-up, at the end) per process: each warms up for a quarter of the run,
        then its memory must stay flat; the old worker's end is the kill."""
        quarter = SECONDS / 4
        return {"daemon": (self._at(self.start + quarter), self._last()),
                "worker (killed)": (self._at(self.start + quarter, old_pid),
                                    self._at(self.kill_at, old_pid)),
                "worker (new)": (self._at(self.kill_at + quarter, new_pid),
                                 self._last(new_pid))}


def _loraxctl(daemon: Daemon, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                          str(daemon.runtime_dir / "control.sock"), *args, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _restarts(daemon: Daemon) -> int:
    return max(w["restarts"] for w in _loraxctl(daemon, "workers")["workers"])


def _print_figures(run: dict, log: str) -> None:
    outcomes = run["outcomes"]
    count = {s: sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}}
    first = re.findall(r"first step on the new workers done ([\d.]+) s", log)
    back = re.findall(r"the workers are back after ([\d.]+) s", log)
    resumed = re.findall(r"(\d+) running request\(s\) will resume", log)
    spanned = run["spanned_kill"]
    print(f"\nsoak: {SECONDS:g} s of load, {STREAMS} streams, {ADAPTERS} adapters in {SLOTS} "
          f"slots, prompts of {MAX_INPUT - 64}..{MAX_INPUT - 8} tokens")
    print(f"requests: {len(outcomes)}; " + ", ".join(f"{n} {s}" for s, n in sorted(
        count.items())) + f"; {sum(o.finish == 'stop_sequence' for o in outcomes)} ended by "
        f"a stop sequence; {sum(o.retries > 0 for o in outcomes)} refused while the worker "
        f"was replaced, then sent again")
    print(f"request time (send to end, retries included): "
          f"{_spread([o.took_s for o in outcomes])} s")
    prompt = sum(run["prompt_lengths"][o.spec.key.prompt] for o in outcomes if o.ids)
    print(f"in {run['elapsed']:.1f} s: {run['tokens']} tokens streamed "
          f"({run['tokens'] / run['elapsed']:.0f}/s), {prompt} prompt tokens prefilled "
          f"({prompt / run['elapsed']:.0f}/s, resumes not counted)")
    print(f"kill -9: daemon resumed {', '.join(resumed) or '?'} running request(s); workers "
          f"back after {', '.join(back) or '?'} s; first step on the new worker "
          f"{', '.join(first) or '?'} s after the loss; {len(spanned)} streams ran across it "
          f"({sum(o.status == COMPLETED for o in spanned)} completed); their next token "
          f"{_spread([o.resumed_s for o in spanned])} s after the kill; longest stall "
          f"{max((o.stall_s for o in spanned), default=0):.2f} s; restarts {run['restarts']}")
    for name, (before, after) in run["rss"].items():
        print(f"RSS {name}: {before / MIB:.1f} MiB after warm-up, {after / MIB:.1f} MiB at "
              f"the end ({(after - before) / MIB:+.1f} MiB); MiB over time: "
              f"{run['rss_series'][name]}")


def _spread(values: list[float]) -> str:
    if not values:
        return "(none)"
    values = sorted(values)
    return f"min {values[0]:.2f} / median {values[len(values) // 2]:.2f} / max {values[-1]:.2f}"
