"""Faults through the real daemon: a worker killed or stopped mid-stream is replaced and the
stream carries on with the uninterrupted run's tokens; an idle stopped worker is found by
its missed pings; a worker that crashes on every start ends the daemon with status 1 after
the backoff; an adapter that kills the worker while loading is quarantined (424) and the
others carry on; SIGTERM with a stopped worker exits in time and leaves no process behind.

The model is a tiny random Llama with the real tokenizer, so restarts take a moment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.integration import tiny_model
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

PROMPT = "The best way to learn is"
LONG = 300
FAST_FAULTS = ("--step-timeout-floor-s", "3", "--heartbeat-interval-s", "0.5",
               "--heartbeat-timeout-s", "3", "--restart-backoff-s", "0.1")

# Loaded into every process of a daemon started with `poisoned_env`: opening the adapter
# "poison"'s weights kills the process, as a loader crash would.
POISON = """
import os, sys
def _poison(event, args):
    if event == "open" and str(args[0]).endswith("poison/adapter_model.safetensors"):
        os.kill(os.getpid(), 9)
sys.addaudithook(_poison)
"""


@pytest.fixture(scope="module")
def root(default_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    root = tiny_model.build(default_model_dir, tmp_path_factory.mktemp("faults-model"))
    shutil.copytree(root / "adapters" / "a", root / "adapters" / "poison")
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(POISON)
    return root


def start(root, tmp, *extra, env=None) -> Daemon:
    return Daemon(root / "model", tmp, "--num-threads", "1", "--adapter-source", "local",
                  "--local-adapter-dir", str(root / "adapters"), "--max-total-tokens", "1024",
                  "--max-input-length", "512", "--max-batch-total-tokens", "8192",
                  *FAST_FAULTS, *extra, env=env).wait_ready()


@pytest.fixture(scope="module")
def daemon(root, tmp_path_factory):
    env = {"PYTHONPATH": os.pathsep.join([str(root / "hook"), os.environ.get("PYTHONPATH", "")])}
    d = start(root, tmp_path_factory.mktemp("faults"), "--max-restarts", "20", env=env)
    yield d
    d.stop()


def generate(d, adapter=None, **params) -> list[int]:
    params = {"max_new_tokens": LONG, "ignore_eos_token": True, "details": True, **params}
    if adapter:
        params["adapter_id"] = adapter
    r = requests.post(d.url + "/generate", json={"inputs": PROMPT, "parameters": params},
                      timeout=120)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def stream_with_fault(d, fault, **params) -> tuple[list[dict], float]:
    """Stream; after the first token, `fault(worker_pid)`. The events, and the seconds from
    the fault to the next token."""
    params = {"max_new_tokens": LONG, "ignore_eos_token": True, **params}
    (pid,) = d.worker_pids()
    with requests.post(d.url + "/generate_stream", json={"inputs": PROMPT,
                       "parameters": params}, stream=True, timeout=120) as r:
        lines = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith(b"data:"))
        events = [next(lines)]
        fault(pid)
        at = time.monotonic()
        events.append(next(lines))
        gap = time.monotonic() - at
        events += list(lines)
    return events, gap


def wait_replaced(d, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = d.worker_pids()
        if pids and old_pid not in pids:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"worker {old_pid} was not replaced:\n{d.log()}")


def resumes(d) -> int:
    return d.log().count("running request(s) will resume")


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 5, "temperature": 0.8}],
                         ids=["greedy", "seeded"])
def test_kill_9_mid_stream_resumes_with_every_token_once(daemon, sampling):
    expected = generate(daemon, **sampling)
    before = resumes(daemon)
    events, gap = stream_with_fault(daemon, lambda pid: os.kill(pid, signal.SIGKILL),
                                    **sampling)
    assert "error" not in events[-1], events[-1]
    assert [e["token"]["id"] for e in events] == expected
    assert resumes(daemon) == before + 1  # it was cut mid-stream, and resumed
    print(f"\nkill -9 -> next token: {gap:.2f} s")


def test_a_stopped_worker_mid_stream_is_replaced_within_the_deadline(daemon):
    expected = generate(daemon)
    events, gap = stream_with_fault(daemon, lambda pid: os.kill(pid, signal.SIGSTOP))
    assert [e["token"]["id"] for e in events] == expected
    assert gap < 3 + 20, gap  # the step deadline's floor, then a restart
    assert "got no answer from the workers within" in daemon.log()
    print(f"\nSIGSTOP mid-stream -> next token: {gap:.2f} s")


def test_an_idle_stopped_worker_misses_its_pings_and_is_replaced(daemon):
    (pid,) = daemon.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    at = time.monotonic()
    wait_replaced(daemon, pid)
    assert time.monotonic() - at < 3 + 20
    assert "left a ping unanswered" in daemon.log()
    assert generate(daemon, max_new_tokens=4)


def test_an_adapter_that_kills_the_worker_while_loading_is_quarantined(daemon):
    expected = generate(daemon, "a")
    result: dict = {}

    def stream_a():
        result["a"], _ = stream_with_fault(daemon, lambda pid: poisoned.start(), adapter_id="a")

    def ask_poison():
        result["poison"] = requests.post(daemon.url + "/generate", timeout=120, json={
            "inputs": PROMPT, "parameters": {"adapter_id": "poison", "max_new_tokens": 4}})
    poisoned = threading.Thread(target=ask_poison)
    stream_a()
    poisoned.join(120)
    r = result["poison"]
    assert r.status_code == 424, r.text
    assert "quarantined: the workers died while loading it 2 times in a row" in r.json()["error"]
    assert [e["token"]["id"] for e in result["a"]] == expected  # resumed twice, unharmed
    again = requests.post(daemon.url + "/generate", timeout=30, json={
        "inputs": PROMPT, "parameters": {"adapter_id": "poison", "max_new_tokens": 4}})
    assert again.status_code == 424 and "quarantined" in again.json()["error"]
    listed = loraxctl(daemon, "adapters", "list", "--json")
    states = {a["key"]: a["status"] for a in json.loads(listed.stdout)["adapters"]}
    assert states["local:poison"] == "quarantined" and states["local:a"] == "loaded"
    assert loraxctl(daemon, "adapters", "unload", "poison").returncode == 0  # lifted
    assert "local:poison" not in loraxctl(daemon, "adapters", "list").stdout


def loraxctl(d, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                           str(d.runtime_dir / "control.sock"), *args],
                          capture_output=True, text=True, timeout=30)


def test_a_worker_that_crashes_on_every_start_ends_the_daemon(root, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    d = Daemon(model, tmp_path, "--num-threads", "1", "--max-restarts", "2",
               "--restart-backoff-s", "0.2", *FAST_FAULTS[:6]).wait_ready()
    try:
        (pid,) = d.worker_pids()
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # every new worker fails to load
        os.kill(pid, signal.SIGKILL)
        assert d.proc.wait(120) == 1, d.log()
    finally:
        d.stop()
    log = d.log()
    assert "restarting the workers in 0.2 s" in log and "restarting the workers in 0.4 s" in log
    assert "the workers failed 3 times within 600 s (worker.max_restarts = 2)" in log
    assert not d.worker_pids()


def test_sigterm_with_a_stopped_worker_exits_in_time(root, tmp_path):
    d = start(root, tmp_path, "--drain-timeout-s", "2")
    (pid,) = d.worker_pids()
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 900, "ignore_eos_token": True}}
    with requests.post(d.url + "/generate_stream", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()  # held: a dropped iterator would close the stream
        next(line for line in lines if line.startswith(b"data:"))
        os.kill(pid, signal.SIGSTOP)
        at = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(30)
        took = time.monotonic() - at
    d.stop()
    assert code == 0, d.log()
    assert 2 <= took < 2 + 6, took  # the drain, then no grace for a worker that cannot read
    assert "stopping with 1 request(s) unfinished" in d.log()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    print(f"\nSIGTERM with a stopped worker: exited in {took:.2f} s")
