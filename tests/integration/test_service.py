"""The daemon as a service, live on the default model: every loraxctl command and exit code,
reload (file, SIGHUP) with a valid and an invalid file, a reloaded HTTP timeout, the log
level reaching the worker, drain and resume, a stop that drains a running stream to its
end, and JSON log lines from the supervisor and the worker."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

CONFIG = """\
[scheduler]
max_input_length = {max_input_length}
max_total_tokens = 2048

[adapters]
adapter_source = "local"
local_adapter_dirs = ["{adapters}"]
"""


def write_adapter(root: Path, model_dir: Path, name: str) -> None:
    """A rank-2 PEFT adapter on every q_proj, written without peft (random, small)."""
    import torch
    from safetensors.torch import save_file
    arch = json.loads((model_dir / "config.json").read_text())
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    out = root / name
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(model_dir), "bias": "none"}))
    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj"
    save_file({f"{prefix.format(i)}.lora_{ab}.weight":
               0.01 * torch.randn(shape, generator=gen)
               for i in range(layers)
               for ab, shape in (("A", (2, hidden)), ("B", (hidden, 2)))},
              str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def daemon(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    write_adapter(tmp / "adapters", default_model_dir, "tiny")
    config = tmp / "loraxd.toml"
    config.write_text(CONFIG.format(max_input_length=1024, adapters=tmp / "adapters"))
    d = Daemon(default_model_dir, tmp, "--config", str(config))
    d.config_path = config
    d.adapters = tmp / "adapters"
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def ctl(daemon, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
    out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                          str(daemon.runtime_dir / "control.sock"), *argv],
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def ctl_json(daemon, *argv: str) -> tuple[int, dict]:
    code, out, err = ctl(daemon, *argv, "--json")
    return code, json.loads(out)


def generate(daemon, inputs: str = "Hello", **params):
    return requests.post(daemon.url + "/generate", timeout=120,
                         json={"inputs": inputs, "parameters": {"max_new_tokens": 2, **params}})


class Stream:
    """A /generate_stream read in a thread: its events, and whether it ended in full."""

    def __init__(self, daemon, max_new_tokens: int):
        self.events: list[dict] = []
        self.started = threading.Event()
        self.error: Exception | None = None
        body = {"inputs": "Once upon a time", "parameters": {
            "max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
        self._thread = threading.Thread(target=self._read, args=(daemon.url, body))
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with requests.post(url + "/generate_stream", json=body, stream=True,
                               timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data:"):
                        self.events.append(json.loads(line[5:]))
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.started.set()

    def join(self, timeout: float = 120) -> list[dict]:
        self._thread.join(timeout)
        assert not self._thread.is_alive() and self.error is None, self.error
        return self.events


def test_every_read_command_answers(daemon):
    code, status = ctl_json(daemon, "status")
    assert code == 0 and status["state"] == "serving" and status["url"] == daemon.url
    assert status["config_file"] == str(daemon.config_path)
    assert status["worker_pids"] == daemon.worker_pids()
    assert ctl_json(daemon, "health") == (0, {"type": "health", "healthy": True,
                                              "state": "serving"})
    code, version = ctl_json(daemon, "version")
    assert code == 0 and version["pid"] == daemon.proc.pid
    code, workers = ctl_json(daemon, "workers")
    [rank0] = workers["workers"]
    assert (rank0["rank"], rank0["pid"], rank0["device"], rank0["state"]) == (
        0, daemon.worker_pids()[0], "cpu", "ready")
    assert rank0["rss_bytes"] > 100 << 20  # the model's weights at least
    for argv in (["status"], ["health"], ["version"], ["workers"], ["adapters"],
                 ["requests"], ["config", "show"], ["config", "check"], ["log-level"]):
        code, out, err = ctl(daemon, *argv)
        assert code == 0 and out.strip() and not err, (argv, out, err)
    code, out, _ = ctl(daemon, "workers")
    assert out.splitlines()[1].split()[3] == "ready"


def test_adapters_load_pin_unpin_unload(daemon):
    code, out, err = ctl(daemon, "adapters", "load", "tiny")
    assert (code, out.strip()) == (0, "adapter local:tiny: loaded in slot 0"), err
    assert generate(daemon, adapter_id="tiny").status_code == 200
    code, data = ctl_json(daemon, "adapters", "pin", "tiny")
    assert code == 0 and data["adapter"]["pinned"] and data["adapter"]["status"] == "loaded"
    code, data = ctl_json(daemon, "adapters")
    assert [(a["key"], a["pinned"]) for a in data["adapters"]] == [("local:tiny", True)]
    assert ctl_json(daemon, "adapters", "unpin", "tiny")[1]["adapter"]["pinned"] is False
    assert ctl(daemon, "adapters", "unload", "tiny")[:2] == (0, "adapter local:tiny unloaded\n")
    assert ctl_json(daemon, "adapters")[1]["adapters"] == []
    code, _, err = ctl(daemon, "adapters", "load", "absent")
    assert code == 1 and "local:absent" in err
    code, _, err = ctl(daemon, "adapters", "unload", "absent")
    assert code == 1 and "not known" in err


def test_requests_list_and_cancel(daemon):
    stream = Stream(daemon, max_new_tokens=400)
    assert stream.started.wait(60)
    code, data = ctl_json(daemon, "requests")
    [row] = [r for r in data["requests"] if r["max_new_tokens"] == 400]
    assert code == 0 and row["state"] == "running" and row["adapter"] == ""
    code, out, _ = ctl(daemon, "requests", "cancel", str(row["request_id"]))
    assert (code, out) == (0, f"request {row['request_id']} cancelled\n")
    events = stream.join()
    assert "cancelled by the operator" in events[-1]["error"] and len(events) < 400
    code, _, err = ctl(daemon, "requests", "cancel", str(row["request_id"]))
    assert code == 1 and f"there is no request {row['request_id']}" in err


def test_drain_refuses_new_requests_and_resume_takes_them_again(daemon):
    stream = Stream(daemon, max_new_tokens=30)
    assert stream.started.wait(60)
    code, out, _ = ctl(daemon, "drain")
    assert code == 0 and out.startswith("draining")
    r = generate(daemon)
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    health = requests.get(daemon.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["error"] == "draining"
    assert ctl_json(daemon, "health") == (1, {"type": "health", "healthy": False,
                                              "state": "draining"})
    assert ctl_json(daemon, "status")[1]["state"] == "draining"
    code, data = ctl_json(daemon, "drain", "--wait", "120")
    assert code == 0 and data["num_requests"] == 0
    events = stream.join()
    assert events[-1]["details"] is None and events[-1]["generated_text"] is not None
    assert len(events) == 30  # the running stream ran to its end
    assert ctl(daemon, "resume")[0] == 0
    assert generate(daemon).status_code == 200
    assert requests.get(daemon.url + "/health", timeout=30).status_code == 200


def test_reload_applies_a_valid_file_and_rejects_an_invalid_one(daemon):
    path = daemon.config_path
    good = path.read_text()
    try:
        path.write_text(CONFIG.format(max_input_length=8, adapters=daemon.adapters)
                        + "[model]\ndtype = \"bfloat16\"\n")
        code, data = ctl_json(daemon, "reload")
        assert code == 0
        assert data["applied"] == [{"key": "scheduler.max_input_length", "old": 1024, "new": 8}]
        assert data["pending_restart"] == [{"key": "model.dtype", "old": "float32",
                                            "new": "bfloat16"}]
        assert requests.get(daemon.url + "/info", timeout=5).json()["max_input_length"] == 8
        assert generate(daemon, "word " * 20).status_code == 422
        code, out, _ = ctl(daemon, "config", "show")
        assert 'dtype = "float32"  # pending restart: "bfloat16"' in out
        assert "max_input_length = 8\n" in out

        path.write_text("[scheduler]\nmax_input_length = -5\n")
        code, out, err = ctl(daemon, "reload")
        assert code == 1 and out == ""
        assert "not reloaded, the running one stays" in err
        assert f"{path}: scheduler.max_input_length = -5: must be a positive integer" in err
        assert ctl(daemon, "config", "check")[0] == 1
        assert requests.get(daemon.url + "/info", timeout=5).json()["max_input_length"] == 8
        assert generate(daemon).status_code == 200  # still serving

        path.write_text("[scheduler\n")  # not even TOML
        code, _, err = ctl(daemon, "reload")
        assert code == 1 and "invalid TOML" in err
    finally:
        path.write_text(good)
    assert ctl(daemon, "reload")[0] == 0
    assert requests.get(daemon.url + "/info", timeout=5).json()["max_input_length"] == 1024


def test_sighup_reloads(daemon):
    path = daemon.config_path
    good = path.read_text()
    try:
        path.write_text(good + "\n[server]\nlog_level = \"warning\"\n")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while ctl(daemon, "log-level")[1].strip() != "warning":
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
    finally:
        path.write_text(good)
    os.kill(daemon.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while ctl(daemon, "log-level")[1].strip() != "info":
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.2)
    assert ctl(daemon, "log-level", "debug")[:2] == (0, "debug\n")
    assert ctl(daemon, "log-level", "info")[:2] == (0, "info\n")


def cut_off_within(daemon, seconds: float) -> bool:
    """Whether a request head trickled one byte per 100 ms is cut off within `seconds`."""
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if time.monotonic() > deadline:
                return False
            try:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], 0.1)[0] and not sock.recv(1024):
                    return True
            except (BrokenPipeError, ConnectionResetError):
                return True
    return False


def test_a_reload_shortens_the_head_deadline_of_a_live_daemon(daemon):
    path = daemon.config_path
    good = path.read_text()
    assert not cut_off_within(daemon, 2.0)  # the default: 10 s
    try:
        path.write_text(good + "\n[server]\nheader_read_timeout_s = 0.5\n")
        code, data = ctl_json(daemon, "reload")
        assert code == 0 and data["applied"] == [
            {"key": "server.header_read_timeout_s", "old": 10.0, "new": 0.5}]
        assert cut_off_within(daemon, 5.0)
        assert generate(daemon).status_code == 200  # a client that sends its head is served
    finally:
        path.write_text(good)
        assert ctl(daemon, "reload")[0] == 0
    assert not cut_off_within(daemon, 2.0)


def test_the_log_level_reaches_the_worker(daemon):
    def worker_step_lines(offset: int) -> list[bytes]:
        return [line for line in daemon.log_path.read_bytes()[offset:].splitlines()
                if b" worker0 DEBUG loraxd.worker: step " in line]
    offset = daemon.log_path.stat().st_size
    assert generate(daemon).status_code == 200
    assert worker_step_lines(offset) == []  # info: no step lines
    assert ctl(daemon, "log-level", "debug")[:2] == (0, "debug\n")
    try:
        offset = daemon.log_path.stat().st_size
        assert generate(daemon).status_code == 200  # the worker logs a step before answering
        assert worker_step_lines(offset), daemon.log()
    finally:
        assert ctl(daemon, "log-level", "info")[:2] == (0, "info\n")
    offset = daemon.log_path.stat().st_size
    assert generate(daemon).status_code == 200
    assert worker_step_lines(offset) == []


def test_exit_codes_of_usage_and_of_an_unreachable_daemon(daemon, tmp_path):
    assert ctl(daemon, "frobnicate")[0] == 2
    assert ctl(daemon, "requests", "cancel", "nan")[0] == 2
    out = subprocess.run([sys.executable, "-m", "loraxd.cli.loraxctl", "--socket",
                          str(tmp_path / "none.sock"), "status"], capture_output=True, text=True)
    assert out.returncode == 69 and "not running" in out.stderr


def test_a_stop_drains_a_running_stream_and_logs_json(default_model_dir, tmp_path):
    d = Daemon(default_model_dir, tmp_path, "--json-output", "--drain-timeout-s", "120")
    try:
        d.wait_ready()
        stream = Stream(d, max_new_tokens=40)
        assert stream.started.wait(60)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):
            while True:  # 503 while it drains, then nothing listens
                assert generate(d).status_code == 503
                time.sleep(0.2)
        events = stream.join()
        assert d.proc.wait(60) == 0
    finally:
        d.stop()
    assert len(events) == 40 and events[-1]["generated_text"] is not None
    lines = [json.loads(line) for line in d.log_path.read_text().splitlines() if line.strip()]
    processes = {entry["process"] for entry in lines}
    assert {"loraxd", "worker0"} <= processes
    finished = [e for e in lines if e["message"].startswith("request ") and "request_id" in e]
    assert any("(length): 4 prompt + 40 generated" in e["message"] for e in finished)
    messages = [e["message"] for e in lines]
    assert any(m.startswith("stopping: draining 1 request(s)") for m in messages)
    assert "drained; stopping" in messages and messages[-1] == "stopped"
