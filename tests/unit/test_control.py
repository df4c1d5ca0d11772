"""The control socket, its commands and loraxctl against a fake service (a real
AdapterManager, real configuration trees), without processes or torch."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from loraxd.cli import loraxctl
from loraxd.config import Config, ConfigError
from loraxd.config.changes import plan_reload
from loraxd.control.client import ControlClient, Unreachable
from loraxd.control.commands import Commands
from loraxd.control.peers import Peer, PeerPolicy
from loraxd.control.server import ControlServer
from loraxd.daemon.supervisor import RankInfo
from loraxd.engine.adapters import AdapterManager
from loraxd.engine.request import AdapterRef, GenerationRequest
from loraxd.engine.sequence import Sequence
from loraxd.protocol.control import (COMMANDS, MAX_REQUEST_BYTES, AdapterList, AdapterState,
                                     AdapterUnloaded, CheckHealth, Error, GetStatus, Health,
                                     ListAdapters, LoadAdapter, Status, UnloadAdapter)


class FakeEngine:
    def __init__(self):
        self.sources = object()
        self.adapters = AdapterManager(num_slots=2, cycle_time_s=10.0, fetch=self._fetch,
                                       load=self._load, on_failed=lambda key, error: None,
                                       wake=lambda: None)
        self.serving = True
        self.healthy = True
        self.fetch_gate: asyncio.Event | None = None
        self.stats_error: Exception | None = None
        self.scheduler = SimpleNamespace(running={}, waiting=[])
        self.cancelled: list[int] = []

    async def _fetch(self, ref):
        if self.fetch_gate is not None:
            await self.fetch_gate.wait()
        if ref.adapter_id == "missing":
            raise FileNotFoundError(f"no adapter {ref.adapter_id!r} in the local dirs")
        return Path("/adapters") / ref.adapter_id

    async def _load(self, slot, entry):
        self.adapters.on_loaded(slot, entry.key, None)

    def stats(self) -> dict:
        if self.stats_error is not None:
            raise self.stats_error
        return {"num_waiting": 3, "num_running": 2, "kv_cache_usage": 0.25, "num_steps": 41}

    def info(self) -> dict:
        return {"model_id": "fake/base", "model_dtype": "float32", "model_device_type": "cpu"}

    async def health(self) -> bool:
        return self.healthy

    @property
    def num_requests(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def cancel(self, req_id: int) -> bool:
        if req_id not in self.scheduler.running:
            return False
        self.cancelled.append(req_id)
        del self.scheduler.running[req_id]
        return True


def tree(**sections) -> Config:
    """A Config with some settings replaced: tree(scheduler={"max_input_length": 512})."""
    base = Config()
    return Config(**{f.name: dataclasses.replace(getattr(base, f.name), **sections.get(f.name, {}))
                     for f in dataclasses.fields(Config)})


class FakeService:
    def __init__(self):
        self.engine = FakeEngine()
        self.supervisor = SimpleNamespace(
            pids=[4242], ranks=lambda: [
                RankInfo(0, 4242, "cpu", "ready", 3 << 30, 12.5, 1, 1 << 30, 1 << 29),
                RankInfo(1, 4243, "cuda:1", "ready", 1 << 30, 12.5, 1, 1 << 30, 1 << 29,
                         device_name="NVIDIA H200", device_total_bytes=80 << 30,
                         device_free_bytes=20 << 30, device_used_bytes=60 << 30,
                         gpu_utilization=0.37, gpu_memory_utilization=0.05),
                RankInfo(2, 4244, "cuda:2", "ready", 1 << 30, 12.5, 1, 1 << 30, 1 << 29,
                         device_name="NVIDIA H200 MIG 1g.18gb", device_total_bytes=18 << 30,
                         device_free_bytes=9 << 30, device_used_bytes=9 << 30)])
        self.state = "serving"
        self.uptime_s = 3723.0
        self.url = "http://127.0.0.1:3000"
        self.config = tree(adapters={"adapter_source": "local"},
                           scheduler={"max_batch_total_tokens": 32768})
        self.config_file = "/etc/loraxd/loraxd.toml"
        self.on_disk: Config | Exception = self.config
        self.log_level = "info"
        self.drained_after: float | None = None  # wait_drained: requests left

    def read_config(self) -> Config:
        if isinstance(self.on_disk, Exception):
            raise self.on_disk
        return self.on_disk

    def drain(self) -> None:
        if self.state == "stopping":
            raise RuntimeError("the daemon is stopping")
        self.state = "draining"

    def resume(self) -> None:
        if self.state == "stopping":
            raise RuntimeError("the daemon is stopping; it cannot resume")
        self.state = "serving"

    async def wait_drained(self, timeout_s: float) -> int:
        return self.engine.num_requests

    async def reload(self):
        plan = plan_reload(self.config, self.read_config())
        self.config = plan.config
        return plan

    def set_log_level(self, level: str) -> None:
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"unknown log level {level!r}")
        self.log_level = level


@pytest.fixture
async def control(tmp_path):
    service = FakeService()
    server = ControlServer(str(tmp_path / "c.sock"), Commands(service))
    await server.start()
    server.service = service
    try:
        yield server
    finally:
        await server.stop()


async def ask(server: ControlServer, request, timeout: float = 5.0):
    return await asyncio.to_thread(ControlClient(server.path, timeout).request, request)


async def exchange(path: str, *lines: bytes) -> list[dict]:
    """Send raw lines on one connection; read replies until the server closes it."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    for line in lines:
        writer.write(line)
    await writer.drain()
    writer.write_eof()
    replies = [json.loads(line) async for line in reader]
    writer.close()
    return replies


async def ctl(control, capsys, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(loraxctl.main, ["--socket", control.path, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


async def ctl_json(control, capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = await ctl(control, capsys, *argv, "--json")
    return code, json.loads(out)


def sequence(req_id: int, adapter: AdapterRef | None = None, generated: int = 0) -> Sequence:
    seq = Sequence(req_id, GenerationRequest([1, 2, 3], max_new_tokens=10, adapter=adapter),
                   detok=SimpleNamespace())
    seq.output_ids.extend([7] * generated)
    return seq


# -- the daemon -------------------------------------------------------------------------------


async def test_status(control, capsys):
    code, out, _ = await ctl(control, capsys, "status")
    assert code == 0
    assert "fake/base (float32 on cpu)" in out and "4242" in out and "1h 02m 03s" in out
    assert "2 running, 3 waiting" in out and "25.0% used" in out and "serving" in out
    code, data = await ctl_json(control, capsys, "status")
    assert code == 0 and data["type"] == "status" and data["worker_pids"] == [4242]
    assert data["state"] == "serving" and data["serving"]
    assert data["url"] == "http://127.0.0.1:3000"
    assert data["config_file"] == "/etc/loraxd/loraxd.toml" and data["num_pending_restart"] == 0


async def test_health_and_its_exit_codes(control, capsys):
    assert await ctl(control, capsys, "health") == (0, "healthy\n", "")
    control.service.engine.healthy = False
    assert await ctl(control, capsys, "health") == (1, "unhealthy\n", "")
    control.service.engine.healthy = True
    control.service.state = "draining"
    assert await ctl(control, capsys, "health") == (1, "unhealthy (draining)\n", "")
    assert await ctl_json(control, capsys, "health") == (
        1, {"type": "health", "healthy": False, "state": "draining"})


async def test_version(control, capsys):
    code, out, _ = await ctl(control, capsys, "version")
    assert code == 0 and out.startswith("loraxctl 0.1.0\nloraxd 0.1.0 (pid ")
    code, data = await ctl_json(control, capsys, "version")
    assert data["loraxctl"] == data["version"] == "0.1.0" and data["pid"] == os.getpid()


async def test_workers(control, capsys):
    code, out, _ = await ctl(control, capsys, "workers")
    head, row0, row1, row2 = out.splitlines()
    assert code == 0 and head.split() == ["RANK", "PID", "DEVICE", "STATE", "MEMORY", "WEIGHTS",
                                          "KV", "GPU", "UTIL", "UPTIME", "RESTARTS", "GPU",
                                          "NAME"]
    assert row0.split() == ["0", "4242", "cpu", "ready", "3.0", "GiB", "1.0", "GiB", "512.0",
                            "MiB", "-", "-", "0h", "00m", "12s", "1", "-"]
    assert row1.split()[:3] == ["1", "4243", "cuda:1"]
    assert "20.0 GiB/80.0 GiB  37%/5%  0h" in row1 and row1.endswith(" NVIDIA H200")
    assert row2.split()[10:13] == ["9.0", "GiB/18.0", "GiB"]
    assert row2.split()[13] == "-"  # NVML has no utilization for a MIG instance
    code, data = await ctl_json(control, capsys, "workers")
    assert data["workers"][0] == {
        "rank": 0, "pid": 4242, "device": "cpu", "state": "ready", "rss_bytes": 3 << 30,
        "uptime_s": 12.5, "restarts": 1, "weight_bytes": 1 << 30, "kv_cache_bytes": 1 << 29,
        "device_total_bytes": 0, "device_free_bytes": 0, "device_name": "",
        "device_used_bytes": 0, "gpu_utilization": None, "gpu_memory_utilization": None}
    assert data["workers"][1]["device_name"] == "NVIDIA H200"
    assert data["workers"][1]["gpu_utilization"] == 0.37
    assert data["workers"][1]["device_used_bytes"] == 60 << 30


# -- adapters ---------------------------------------------------------------------------------


async def test_adapters_load_list_pin_unpin_unload(control, capsys):
    assert await ctl(control, capsys, "adapters") == (0, "no adapters\n", "")
    code, out, _ = await ctl(control, capsys, "adapters", "load", "alpha")
    assert (code, out) == (0, "adapter local:alpha: loaded in slot 0\n")
    code, out, _ = await ctl(control, capsys, "adapters", "pin", "beta", "--source", "hub")
    assert (code, out) == (0, "adapter hub:beta: loaded in slot 1, pinned\n")
    code, out, _ = await ctl(control, capsys, "adapters", "list")
    head, *rows = out.splitlines()
    assert head.split() == ["ADAPTER", "STATUS", "SLOT", "RUNNING", "WAITING", "PINNED"]
    assert [r.split() for r in rows] == [["local:alpha", "loaded", "0", "0", "0", "no"],
                                         ["hub:beta", "loaded", "1", "0", "0", "yes"]]
    code, data = await ctl_json(control, capsys, "adapters", "unpin", "beta", "--source", "hub")
    assert code == 0 and data["adapter"]["pinned"] is False
    assert await ctl(control, capsys, "adapters", "unload", "alpha") == (
        0, "adapter local:alpha unloaded\n", "")
    manager = control.service.engine.adapters
    assert list(manager.entries) == ["hub:beta"] and manager.slots == [None, "hub:beta"]


async def test_adapter_refusals_exit_1(control, capsys):
    code, out, err = await ctl(control, capsys, "adapters", "load", "missing")
    assert code == 1 and out == "" and "local:missing" in err and "no adapter" in err
    code, _, err = await ctl(control, capsys, "adapters", "unload", "nope")
    assert code == 1 and "adapter local:nope is not known" in err
    code, _, err = await ctl(control, capsys, "adapters", "unpin", "nope")
    assert code == 1 and "not known" in err
    await ctl(control, capsys, "adapters", "load", "busy")
    control.service.engine.adapters.entries["local:busy"].num_running = 1
    code, _, err = await ctl(control, capsys, "adapters", "unload", "busy")
    assert code == 1 and "cannot be unloaded now: 1 running and 0 waiting" in err
    control.service.engine.sources = None
    code, _, err = await ctl(control, capsys, "adapters", "load", "alpha")
    assert code == 1 and "serves no adapters" in err


async def test_a_load_that_does_not_finish_in_time_exits_1(control, capsys):
    engine = control.service.engine
    engine.fetch_gate = asyncio.Event()
    loading = asyncio.ensure_future(ask(control, LoadAdapter("slow", wait_s=0.1)))
    await asyncio.sleep(0.2)
    assert not loading.done()  # it waits for the fetch first
    assert (await ask(control, ListAdapters())).adapters[0].status == "fetching"
    engine.fetch_gate.set()
    assert isinstance(await loading, AdapterState)

    async def never(slot, entry):
        pass
    engine.adapters._load = never
    code, out, err = await ctl(control, capsys, "adapters", "load", "stuck", "--wait", "0.1")
    assert code == 1 and "loading" in out and "still loading after 0.1 s" in err


async def test_unload_of_a_moving_adapter_is_refused(control):
    control.service.engine.fetch_gate = asyncio.Event()
    control.service.engine.adapters.preload(AdapterRef("slow", "local"), pin=False)
    reply = await ask(control, UnloadAdapter("slow"))
    assert isinstance(reply, Error) and "it is fetching" in reply.error
    control.service.engine.fetch_gate.set()
    await asyncio.sleep(0.05)
    assert isinstance(await ask(control, UnloadAdapter("slow")), AdapterUnloaded)


# -- requests ---------------------------------------------------------------------------------


async def test_requests_list_and_cancel(control, capsys):
    scheduler = control.service.engine.scheduler
    assert await ctl(control, capsys, "requests") == (0, "no requests\n", "")
    scheduler.running[5] = sequence(5, AdapterRef("a", "local"), generated=4)
    scheduler.waiting.append(sequence(7))
    code, out, _ = await ctl(control, capsys, "requests", "list")
    head, first, second = out.splitlines()
    assert head.split() == ["ID", "STATE", "ADAPTER", "PROMPT", "GENERATED", "MAX_NEW", "AGE"]
    assert first.split()[:6] == ["5", "running", "local:a", "3", "4", "10"]
    assert second.split()[:3] == ["7", "waiting", "(base)"]
    code, data = await ctl_json(control, capsys, "requests")
    assert [r["request_id"] for r in data["requests"]] == [5, 7]
    assert await ctl(control, capsys, "requests", "cancel", "5") == (
        0, "request 5 cancelled\n", "")
    code, _, err = await ctl(control, capsys, "requests", "cancel", "5")
    assert code == 1 and "there is no request 5" in err


# -- drain and resume -------------------------------------------------------------------------


async def test_drain_and_resume(control, capsys):
    service = control.service
    assert await ctl(control, capsys, "drain") == (0, "draining: no request left\n", "")
    assert service.state == "draining"
    service.engine.scheduler.running[3] = sequence(3)
    assert await ctl(control, capsys, "drain") == (0, "draining: 1 request(s) still running\n",
                                                   "")
    code, out, err = await ctl(control, capsys, "drain", "--wait", "0.1")
    assert code == 1 and "1 request(s) still running after 0.1 s" in err
    assert await ctl(control, capsys, "resume") == (0, "serving; 1 request(s) in flight\n", "")
    assert service.state == "serving"
    service.state = "stopping"
    code, _, err = await ctl(control, capsys, "resume")
    assert code == 1 and "stopping" in err
    code, _, err = await ctl(control, capsys, "drain")
    assert code == 1 and "stopping" in err


# -- configuration ----------------------------------------------------------------------------


async def test_reload_applies_live_settings_and_holds_the_others(control, capsys):
    service = control.service
    service.on_disk = tree(adapters={"adapter_source": "local"},
                           scheduler={"max_input_length": 512, "max_batch_total_tokens": 65536})
    code, out, _ = await ctl(control, capsys, "reload")
    assert code == 0
    assert out.splitlines() == ["reloaded /etc/loraxd/loraxd.toml", "applied:",
                                "  scheduler.max_input_length: 1024 -> 512",
                                "pending restart:",
                                "  scheduler.max_batch_total_tokens: 32768 -> 65536"]
    assert service.config.scheduler.max_input_length == 512
    assert service.config.scheduler.max_batch_total_tokens == 32768
    code, data = await ctl_json(control, capsys, "status")
    assert data["num_pending_restart"] == 1
    code, data = await ctl_json(control, capsys, "reload")
    assert data["applied"] == [] and data["pending_restart"] == [
        {"key": "scheduler.max_batch_total_tokens", "old": 32768, "new": 65536}]


async def test_an_invalid_configuration_is_rejected_whole(control, capsys):
    service = control.service
    before = service.config
    service.on_disk = ConfigError("/etc/loraxd/loraxd.toml: scheduler.max_input_length = -1: "
                                  "must be a positive integer")
    code, out, err = await ctl(control, capsys, "reload")
    assert code == 1 and out == ""
    assert err == ("loraxctl: configuration not reloaded, the running one stays: "
                   "/etc/loraxd/loraxd.toml: scheduler.max_input_length = -1: must be a "
                   "positive integer\n")
    assert service.config is before
    code, data = await ctl_json(control, capsys, "config", "check")
    assert code == 1 and data["type"] == "error" and "must be a positive integer" in data["error"]


async def test_a_reload_must_fit_the_settings_that_wait_for_a_restart(control, capsys):
    control.service.on_disk = tree(scheduler={"max_total_tokens": 40000,
                                              "max_batch_total_tokens": 65536})
    code, _, err = await ctl(control, capsys, "reload")
    assert code == 1 and "max_total_tokens = 40000" in err and "32768" in err
    assert "keep their running values" in err


async def test_config_check_applies_nothing(control, capsys):
    service = control.service
    service.on_disk = tree(adapters={"adapter_source": "local"},
                           scheduler={"max_input_length": 512, "max_batch_total_tokens": 32768},
                           model={"dtype": "bfloat16"})
    code, out, _ = await ctl(control, capsys, "config", "check")
    assert code == 0 and out.splitlines() == [
        "configuration valid: /etc/loraxd/loraxd.toml", "a reload would apply:",
        "  scheduler.max_input_length: 1024 -> 512", "waiting for a restart:",
        '  model.dtype: "float32" -> "bfloat16"']
    assert service.config.scheduler.max_input_length == 1024


async def test_config_show_marks_what_is_pending(control, capsys):
    service = control.service
    service.on_disk = tree(adapters={"adapter_source": "local"},
                           scheduler={"max_input_length": 512}, model={"dtype": "bfloat16"})
    code, out, _ = await ctl(control, capsys, "config", "show")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "# /etc/loraxd/loraxd.toml, as in force"
    assert 'dtype = "float32"  # pending restart: "bfloat16"' in lines
    assert "max_input_length = 1024  # pending reload: 512" in lines
    assert "revision = (unset)" in lines and "[scheduler]" in lines
    code, data = await ctl_json(control, capsys, "config", "show")
    by_key = {s["key"]: s for s in data["settings"]}
    assert by_key["model.dtype"] == {"key": "model.dtype", "value": "float32",
                                     "reloadable": False, "pending": "restart",
                                     "pending_value": "bfloat16"}
    assert by_key["scheduler.max_input_length"]["reloadable"] is True
    assert by_key["server.port"]["pending"] == ""
    service.on_disk = ConfigError("bad file")
    code, out, _ = await ctl(control, capsys, "config", "show")
    assert code == 0 and "# the file does not load now: bad file" in out


async def test_log_level(control, capsys):
    assert await ctl(control, capsys, "log-level") == (0, "info\n", "")
    assert await ctl(control, capsys, "log-level", "debug") == (0, "debug\n", "")
    assert control.service.log_level == "debug"


# -- usage and the socket ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["log-level", "loud"], ["config"],
                                  ["requests", "cancel", "x"], ["adapters", "load"],
                                  ["adapters", "load", "a", "--source", "pbase"]])
def test_usage_errors_exit_2(argv, capsys):
    assert loraxctl.main(argv) == 2
    assert "usage: loraxctl" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert loraxctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "69 daemon unreachable" in out
    for command in ("status", "health", "version", "workers", "adapters", "requests", "drain",
                    "resume", "reload", "config", "log-level"):
        assert command in out


async def test_the_socket_from_the_environment(control, capsys, monkeypatch):
    monkeypatch.setenv("LORAXD_SOCKET", control.path)
    code = await asyncio.to_thread(loraxctl.main, ["health", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["healthy"] is True


def test_without_a_daemon_exit_69(tmp_path, capsys):
    path = str(tmp_path / "absent.sock")
    assert loraxctl.main(["--socket", path, "status"]) == 69
    err = capsys.readouterr().err
    assert err == f"loraxctl: loraxd is not running: there is no control socket at {path}\n"
    assert loraxctl.main(["--socket", path, "status", "--json"]) == 69
    data = json.loads(capsys.readouterr().out)
    assert data["type"] == "error" and data["unreachable"] and "no control socket" in data["error"]
    assert loraxctl.main(["--socket", path, "version"]) == 69
    assert capsys.readouterr().out == "loraxctl 0.1.0\n"


def test_on_a_dead_socket_exit_69(tmp_path, capsys):
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    assert loraxctl.main(["--socket", str(path), "health"]) == 69
    assert "nothing answers on" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes every permission check")
def test_permission_denied_on_the_socket_exits_1(tmp_path, capsys):
    path = tmp_path / "locked.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen()
    os.chmod(path, 0)
    try:
        assert loraxctl.main(["--socket", str(path), "status"]) == 1
    finally:
        sock.close()
    assert "permission denied" in capsys.readouterr().err


def test_client_times_out(tmp_path):
    path = tmp_path / "mute.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen()  # accepts (backlog) but never answers
    try:
        with pytest.raises(Unreachable, match="did not answer within 0.2 s"):
            ControlClient(str(path), timeout=0.2).request(GetStatus())
    finally:
        sock.close()


# -- peer credentials -------------------------------------------------------------------------


def test_peer_policy():
    policy = PeerPolicy(group=4321, owner=999)
    me = os.getpid()
    assert policy.refusal(Peer(me, 0, 0)) is None  # root
    assert policy.refusal(Peer(me, 999, 999)) is None  # the daemon's user
    assert policy.refusal(Peer(1, 1234, 4321)) is None  # primary group
    refusal = policy.refusal(Peer(1, 1234, 1234))
    assert refusal == ("permission denied: uid 1234 is neither root, the daemon's user, nor in "
                       "group 4321")
    status = Path(f"/proc/{me}/status").read_text()
    groups = next(line.split()[1:] for line in status.splitlines() if line.startswith("Groups:"))
    for gid in groups:  # the process's supplementary groups count, whatever its uid says
        assert PeerPolicy(group=int(gid), owner=999).refusal(Peer(me, 1234, 1234)) is None


def test_peer_groups_from_the_group_database_when_proc_is_hidden(monkeypatch):
    import loraxd.control.peers as peers
    monkeypatch.setattr(peers.pwd, "getpwuid", lambda uid: SimpleNamespace(pw_name="alice"))
    monkeypatch.setattr(peers.os, "getgrouplist", lambda name, gid: [gid, 4321])
    gone = 2 ** 22 + 7  # no such pid: /proc/<pid>/status cannot be read
    assert PeerPolicy(group=4321, owner=999).refusal(Peer(gone, 1234, 1234)) is None
    assert PeerPolicy(group=555, owner=999).refusal(Peer(gone, 1234, 1234)) is not None


async def test_a_peer_outside_the_policy_is_refused(tmp_path, capsys):
    service = FakeService()
    outsider = PeerPolicy(group=-5, owner=-5)
    outsider.refusal = lambda peer: f"permission denied: uid {peer.uid} is not welcome"
    server = ControlServer(str(tmp_path / "c.sock"), Commands(service), policy=outsider)
    await server.start()
    try:
        reply = await ask(server, GetStatus())
        code = await asyncio.to_thread(loraxctl.main, ["--socket", server.path, "status"])
    finally:
        await server.stop()
    assert reply == Error(f"permission denied: uid {os.geteuid()} is not welcome")
    assert code == 1 and "is not welcome" in capsys.readouterr().err


# -- hostile input ----------------------------------------------------------------------------


async def test_bad_requests_get_errors_and_the_connection_keeps_serving(control):
    replies = await exchange(control.path, b"{not json\n", b'{"command": "reboot"}\n',
                             b'{"command": "adapter_load", "adapter_id": 7}\n', b"[1, 2]\n",
                             b"\n", b'{"command": "status", "extra": 1}\n',
                             b'{"command": "status"}\n')
    assert [r["type"] for r in replies] == ["error"] * 5 + ["status"]
    assert replies[0]["error"].startswith("malformed request")
    assert replies[1]["error"] == ("unknown command 'reboot'; the commands are "
                                   + ", ".join(COMMANDS))
    assert "Expected `str`, got `int`" in replies[2]["error"]
    assert replies[3]["error"].startswith("invalid request")
    assert "unknown field" in replies[4]["error"]


async def test_an_oversized_line_is_refused_and_the_server_keeps_serving(control):
    replies = await exchange(control.path, b"x" * (MAX_REQUEST_BYTES + 10) + b"\n",
                             b'{"command": "status"}\n')
    assert replies == [{"type": "error",
                        "error": f"request line over {MAX_REQUEST_BYTES} bytes"}]
    assert isinstance(await ask(control, GetStatus()), Status)


async def test_a_failing_handler_answers_an_error(control):
    control.service.engine.stats_error = RuntimeError("boom")
    assert await ask(control, GetStatus()) == Error("internal error: boom")
    control.service.engine.stats_error = None
    assert isinstance(await ask(control, GetStatus()), Status)


async def test_a_last_line_without_newline_is_answered(control):
    assert [r["type"] for r in await exchange(control.path, b'{"command": "health"}')] == \
        ["health"]


# -- the socket file --------------------------------------------------------------------------


async def test_socket_mode_and_removal(tmp_path):
    path = tmp_path / "run" / "c.sock"
    server = ControlServer(str(path), Commands(FakeService()))
    await server.start()
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o660
    assert server.policy.group == path.stat().st_gid
    await server.stop()
    assert not path.exists()
    await server.stop()  # twice is harmless


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path):
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = ControlServer(str(path), Commands(FakeService()))
    await first.start()
    second = ControlServer(str(path), Commands(FakeService()))
    with pytest.raises(OSError, match="another loraxd is answering"):
        await second.start()
    await second.stop()  # must not remove the first one's socket
    assert isinstance(await ask(first, GetStatus()), Status)
    await first.stop()


def test_loraxctl_imports_only_the_protocol_the_client_and_the_path_rules():
    import subprocess
    import sys
    code = ("import sys, loraxd.cli.loraxctl\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('loraxd'))))\n"
            "print(','.join(m for m in ('torch', 'aiohttp', 'zmq', 'numpy') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split(",") == ["loraxd", "loraxd.cli", "loraxd.cli.loraxctl",
                                 "loraxd.cli.render", "loraxd.config",
                                 "loraxd.config.loader", "loraxd.config.lorax_only",
                                 "loraxd.config.tree", "loraxd.control",
                                 "loraxd.control.client", "loraxd.protocol",
                                 "loraxd.protocol.control"]
    assert out[1] == ""


def test_every_reply_round_trips():
    reply = Status("0.1.0", 1, "serving", True, "m", "float32", "cpu", "http://h:1", 1.5, [2], 0, 0,
                   0.0, 0, 0, 4, 0, None, 0)
    assert msgspec.json.decode(msgspec.json.encode(reply), type=Status) == reply
    assert msgspec.json.decode(b'{"type": "health", "healthy": true, "state": "serving"}',
                               type=Health) == Health(True, "serving")
    assert isinstance(CheckHealth(), CheckHealth) and isinstance(AdapterList([]), AdapterList)
