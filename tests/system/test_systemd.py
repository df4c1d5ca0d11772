"""loraxd under a real systemd (252, in a container; see container.py), installed by
scripts/install: READY and STATUS, a generate over HTTP, the control socket for the loraxd
group only, systemctl reload with a valid and an invalid file, systemctl stop draining a
running stream to its end, the watchdog restarting a hung engine, exit 78 not restarted,
`systemd-analyze verify` and `security`, and --uninstall.

The container has no network: the dependencies come from the test venv (scripts/install
--deps-from) and the default model is copied in. Skipped, with the reason, where
systemd-nspawn cannot run (not root, not installed, no overlayfs, ...).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from tests.system.container import Container, unavailable

pytestmark = [pytest.mark.systemd, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
UNIT = "loraxd.service"
URL = "http://127.0.0.1:3000"
CONFIG = """\
[model]
model_id = "/opt/loraxd-model"

[scheduler]
max_input_length = {max_input_length}
max_batch_total_tokens = 8192
max_batch_prefill_tokens = 4096

[server]
drain_timeout_s = 50  # within the unit's TimeoutStopSec (60 s), for slow shared hosts

[worker]
num_threads = 2
"""
TIMINGS: dict[str, float] = {}
SKIPPED: dict[str, str] = {}  # why, once found: the other tests skip without trying again


@pytest.fixture(scope="module")
def machine(default_model_dir, tmp_path_factory):
    why = SKIPPED.get("why") or unavailable()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if why is None and Path("/usr/bin/python3").resolve().name != f"python{version}":
        why = (f"/usr/bin/python3 is not Python {version} like the test venv, whose packages "
               "the install takes")
    if why is not None:
        SKIPPED["why"] = why
        pytest.skip(f"systemd-nspawn cannot run here: {why}")
    stage = tmp_path_factory.mktemp("stage")
    box = Container(stage, {str(REPO): "/opt/loraxd-src",
                            sysconfig.get_paths()["purelib"]: "/opt/loraxd-deps",
                            str(default_model_dir): "/opt/loraxd-model-src"})
    started = time.monotonic()
    try:
        box.boot()
    except Exception as exc:
        box.poweroff()
        if isinstance(exc, RuntimeError):
            SKIPPED["why"] = str(exc)
            pytest.skip(f"systemd-nspawn cannot run here: {exc}")
        raise
    TIMINGS["boot"] = time.monotonic() - started
    try:
        box.run("cp", "-r", "/opt/loraxd-model-src", "/opt/loraxd-model")
        box.run("chmod", "-R", "a+rX", "/opt/loraxd-model")
        started = time.monotonic()
        box.install = box.run("/opt/loraxd-src/scripts/install", "--deps-from",
                              "/opt/loraxd-deps", "--no-start", timeout=600)
        TIMINGS["install"] = time.monotonic() - started
        box.write("/etc/loraxd/loraxd.toml", CONFIG.format(max_input_length=1024))
        box.run("useradd", "--no-create-home", "--groups", "loraxd", "alice")
        box.run("useradd", "--no-create-home", "bob")
        yield box
    finally:
        if TIMINGS:
            print("\nsystemd test timings: " + ", ".join(f"{k} {v:.1f} s"
                                                         for k, v in TIMINGS.items()))
        box.poweroff()


def http(box: Container, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    """One request from inside the container's network (it has no other)."""
    code = textwrap.dedent(f"""
        import json, sys, urllib.request, urllib.error
        body = {json.dumps(body)!r}
        req = urllib.request.Request({URL + path!r}, data=None if body == "null" else
                                     body.encode(), headers={{"Content-Type": "application/json"}})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        print(json.dumps([status, text]))
    """)
    out = box.run(sys.executable, "-c", code, only_net=True)
    status, text = json.loads(out.stdout)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def loraxctl(box: Container, *argv: str, user: str | None = None):
    return box.run("/usr/local/bin/loraxctl", *argv, user=user, check=False)


def start(box: Container) -> None:
    if box.show(UNIT, "ActiveState")["ActiveState"] == "active":
        return
    started = time.monotonic()
    out = box.run("systemctl", "start", UNIT, timeout=600, check=False)  # returns at READY=1
    assert out.returncode == 0, out.stderr + box.journal(UNIT)[-4000:]
    TIMINGS.setdefault("start", time.monotonic() - started)


def test_the_install_put_everything_in_place(machine):
    assert "installed /etc/loraxd/loraxd.toml" in machine.install.stdout
    for path in ("/etc/systemd/system/loraxd.service", "/etc/sysusers.d/loraxd.conf",
                 "/etc/tmpfiles.d/loraxd.conf", "/opt/loraxd/venv/bin/loraxd"):
        machine.run("test", "-f", path)
    assert machine.run("readlink", "/usr/local/bin/loraxctl").stdout.strip() == \
        "/opt/loraxd/venv/bin/loraxctl"
    assert machine.run("getent", "passwd", "loraxd").stdout.split(":")[5] == "/var/lib/loraxd"
    assert machine.run("stat", "-c", "%U:%G %a", "/var/cache/loraxd").stdout.strip() == \
        "loraxd:loraxd 750"
    assert machine.show(UNIT, "UnitFileState")["UnitFileState"] == "enabled"
    python = machine.run("readlink", "-f", "/opt/loraxd/venv/bin/python").stdout.strip()
    assert python.startswith("/usr/bin/python3")
    # an edited config survives a reinstall; the new shipped one goes beside it
    again = machine.run("/opt/loraxd-src/scripts/install", "--deps-from", "/opt/loraxd-deps",
                        "--no-start", timeout=600)
    assert "kept the edited /etc/loraxd/loraxd.toml" in again.stdout
    assert "/opt/loraxd-model" in machine.run("cat", "/etc/loraxd/loraxd.toml").stdout
    machine.run("cmp", "/etc/loraxd/loraxd.toml.new", "/opt/loraxd-src/etc/loraxd/loraxd.toml")


def test_the_unit_verifies_cleanly_and_rates_at_most_4(machine):
    verify = machine.run("systemd-analyze", "verify", "/etc/systemd/system/loraxd.service",
                         check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = machine.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    score = re.search(r"Overall exposure level for loraxd.service: (\d+\.\d+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 4.0, security.stdout


def test_start_is_ready_only_once_serving(machine):
    start(machine)
    props = machine.show(UNIT, "ActiveState", "SubState", "StatusText", "Type", "MainPID")
    assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running",
                                                                        "notify")
    assert props["StatusText"].startswith(
        "serving /opt/loraxd-model on http://127.0.0.1:3000; 0 running, 0 waiting")
    # READY=1 came after the sockets were bound: both answer at once
    assert http(machine, "/health")[0] == 200
    assert loraxctl(machine, "health").returncode == 0
    journal = machine.journal(UNIT)
    assert "worker(s) ready" in journal and "serving /opt/loraxd-model" in journal


def test_generate_over_http(machine):
    start(machine)
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    status, body = http(machine, "/generate", {"inputs": prompt,
                                               "parameters": {"max_new_tokens": 20}})
    assert status == 200 and "Paris" in body["generated_text"], body


def test_the_control_socket_is_for_the_loraxd_group(machine):
    start(machine)
    assert machine.run("stat", "-c", "%F %a %U:%G", "/run/loraxd/control.sock").stdout.strip() \
        == "socket 660 loraxd:loraxd"
    out = loraxctl(machine, "status", "--json", user="alice")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["state"] == "serving" and status["model_id"] == "/opt/loraxd-model"
    assert status["config_file"] == "/etc/loraxd/loraxd.toml"
    refused = loraxctl(machine, "status", "--json", user="bob")
    assert refused.returncode == 1
    assert "permission denied" in json.loads(refused.stdout)["error"]
    assert loraxctl(machine, "workers").returncode == 0  # root


def test_systemctl_reload_applies_a_valid_file_and_refuses_an_invalid_one(machine):
    start(machine)
    pid = machine.show(UNIT, "MainPID")["MainPID"]
    machine.write("/etc/loraxd/loraxd.toml", CONFIG.format(max_input_length=16))
    machine.run("systemctl", "reload", UNIT)
    assert http(machine, "/info")[1]["max_input_length"] == 16
    assert http(machine, "/generate", {"inputs": "word " * 40})[0] == 422

    machine.write("/etc/loraxd/loraxd.toml", "[scheduler]\nmax_input_length = -3\n")
    failed = machine.run("systemctl", "reload", UNIT, check=False)
    assert failed.returncode != 0
    props = machine.show(UNIT, "ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"], props["MainPID"]) == ("active", "running",
                                                                           pid)
    assert "scheduler.max_input_length = -3: must be a positive integer" in machine.journal(UNIT)
    assert http(machine, "/info")[1]["max_input_length"] == 16
    assert http(machine, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}})[0] \
        == 200
    machine.write("/etc/loraxd/loraxd.toml", CONFIG.format(max_input_length=1024))
    machine.run("systemctl", "reload", UNIT)
    assert http(machine, "/info")[1]["max_input_length"] == 1024


def test_systemctl_stop_drains_a_running_stream_to_its_end(machine):
    start(machine)
    code = textwrap.dedent(f"""
        import json, urllib.request
        body = json.dumps({{"inputs": "Once upon a time", "parameters": {{
            "max_new_tokens": 30, "ignore_eos_token": True}}}}).encode()
        req = urllib.request.Request({URL + "/generate_stream"!r}, data=body,
                                     headers={{"Content-Type": "application/json"}})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data:"):
                    print(line[5:].decode().strip(), flush=True)
    """)
    client = subprocess.Popen(machine.command(sys.executable, "-c", code, only_net=True),
                              stdout=subprocess.PIPE, text=True)
    first = client.stdout.readline()
    assert json.loads(first)["token"]
    started = time.monotonic()
    machine.run("systemctl", "stop", UNIT, timeout=120)
    TIMINGS["stop"] = time.monotonic() - started
    rest = client.communicate(timeout=60)[0].splitlines()
    events = [json.loads(first)] + [json.loads(line) for line in rest]
    assert client.returncode == 0 and len(events) == 30
    assert events[-1]["generated_text"] is not None
    props = machine.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == ("inactive",
                                                                                "success", "0")
    journal = machine.journal(UNIT)
    assert "stopping: draining 1 request(s)" in journal and "drained; stopping" in journal


def test_the_watchdog_restarts_a_hung_engine(machine):
    machine.write("/etc/systemd/system/loraxd.service.d/watchdog.conf",
                  "[Service]\nWatchdogSec=4\n")
    machine.run("systemctl", "daemon-reload")
    start(machine)
    before = machine.show(UNIT, "MainPID", "NRestarts")
    [worker] = json.loads(loraxctl(machine, "workers", "--json").stdout)["workers"]
    machine.run("kill", "-STOP", str(worker["pid"]))  # its step never ends: no heartbeat
    hung = time.monotonic()
    deadline = hung + 180
    while True:
        props = machine.show(UNIT, "MainPID", "NRestarts", "ActiveState", "SubState")
        if props["NRestarts"] != before["NRestarts"] and props["SubState"] == "running":
            break
        assert time.monotonic() < deadline, machine.journal(UNIT)[-3000:]
        time.sleep(0.5)
    TIMINGS["watchdog restart"] = time.monotonic() - hung
    assert props["MainPID"] != before["MainPID"]
    assert int(props["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = machine.journal(UNIT)
    assert "no more watchdog pings" in journal
    assert re.search(r"[Ww]atchdog timeout", machine.run(
        "journalctl", "--no-pager", "-u", UNIT, check=False).stdout)
    [fresh] = json.loads(loraxctl(machine, "workers", "--json").stdout)["workers"]
    assert fresh["pid"] != worker["pid"] and fresh["state"] == "ready"
    assert http(machine, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}})[0] \
        == 200
    machine.run("rm", "-r", "/etc/systemd/system/loraxd.service.d")
    machine.run("systemctl", "daemon-reload")


def test_a_bad_configuration_exits_78_and_is_not_restarted(machine):
    machine.run("systemctl", "stop", UNIT, timeout=120)
    machine.write("/etc/loraxd/loraxd.toml", "[server]\nport = 0\n")
    assert machine.run("systemctl", "start", UNIT, check=False).returncode != 0
    time.sleep(3)  # longer than RestartSec=2
    props = machine.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert (props["ActiveState"], props["ExecMainStatus"]) == ("failed", "78"), props
    assert "server.port = 0: must be between 1 and 65535" in machine.journal(UNIT)
    machine.write("/etc/loraxd/loraxd.toml", CONFIG.format(max_input_length=1024))


def test_uninstall(machine):
    out = machine.run("/opt/loraxd-src/scripts/install", "--uninstall")
    assert "kept the edited /etc/loraxd/loraxd.toml" in out.stdout
    for path in ("/etc/systemd/system/loraxd.service", "/etc/sysusers.d/loraxd.conf",
                 "/usr/local/bin/loraxctl", "/opt/loraxd"):
        assert machine.run("test", "-e", path, check=False).returncode == 1, path
    assert machine.show(UNIT, "LoadState")["LoadState"] == "not-found"
    machine.run("getent", "passwd", "loraxd")  # the user stays without --purge
    machine.run("/opt/loraxd-src/scripts/install", "--uninstall", "--purge")
    assert machine.run("getent", "passwd", "loraxd", check=False).returncode == 2
    assert machine.run("test", "-e", "/etc/loraxd/loraxd.toml", check=False).returncode == 1
