"""The control socket and loraxctl against a fake engine (a real AdapterManager)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from loraxd.cli import loraxctl
from loraxd.control.client import ControlClient, ControlError
from loraxd.control.server import ControlServer
from loraxd.engine.adapters import AdapterManager
from loraxd.protocol.control import (MAX_REQUEST_BYTES, AdapterFetched, AdapterList,
                                     CheckHealth, Error, GetStatus, Health, ListAdapters,
                                     PreloadAdapter, Status)


class FakeEngine:
    def __init__(self):
        self.config = SimpleNamespace(adapters=SimpleNamespace(adapter_source="local"))
        self.sources = object()
        self.adapters = AdapterManager(num_slots=2, cycle_time_s=10.0, fetch=self._fetch,
                                       load=self._load, on_failed=lambda key, error: None,
                                       wake=lambda: None)
        self.serving = True
        self.healthy = True
        self.fetch_gate: asyncio.Event | None = None
        self.stats_error: Exception | None = None

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


@pytest.fixture
async def control(tmp_path):
    engine = FakeEngine()
    server = ControlServer(str(tmp_path / "c.sock"), engine, SimpleNamespace(pids=[4242]))
    await server.start()
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


async def loraxctl_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(loraxctl.main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- commands ---------------------------------------------------------------------------------


async def test_status_reads_the_engine(control):
    reply = await ask(control, GetStatus())
    assert isinstance(reply, Status)
    assert (reply.model_id, reply.dtype, reply.device) == ("fake/base", "float32", "cpu")
    assert reply.worker_pids == [4242] and reply.pid == os.getpid() and reply.serving
    assert (reply.num_running, reply.num_waiting, reply.num_steps) == (2, 3, 41)
    assert reply.kv_cache_usage == 0.25 and reply.uptime_s >= 0
    assert (reply.num_adapters_loaded, reply.num_adapter_slots) == (0, 2)
    control.engine.serving = False
    assert not (await ask(control, GetStatus())).serving


async def test_load_fetches_pins_and_lists(control):
    reply = await ask(control, PreloadAdapter("alpha"))
    assert isinstance(reply, AdapterFetched)
    assert reply.adapter.key == "local:alpha" and reply.adapter.pinned
    await asyncio.sleep(0)  # the fake load completes on the loop
    listing = await ask(control, ListAdapters())
    assert isinstance(listing, AdapterList)
    [alpha] = listing.adapters
    assert (alpha.key, alpha.status, alpha.slot, alpha.pinned) == ("local:alpha", "loaded", 0,
                                                                    True)
    status = await ask(control, GetStatus())
    assert (status.num_adapters_loaded, status.num_adapters_known) == (1, 1)


async def test_load_pins_a_known_adapter_in_place(control):
    manager = control.engine.adapters
    await ask(control, PreloadAdapter("beta", source="hub"))
    entry = manager.entries["hub:beta"]
    entry.pinned = False
    reply = await ask(control, PreloadAdapter("beta", source="hub"))
    assert reply.adapter.pinned and manager.entries["hub:beta"] is entry


async def test_load_answers_with_the_fetch_error(control):
    reply = await ask(control, PreloadAdapter("missing"))
    assert isinstance(reply, Error)
    assert "local:missing" in reply.error and "no adapter 'missing'" in reply.error
    assert "local:missing" not in control.engine.adapters.entries


async def test_load_waits_for_the_fetch(control):
    control.engine.fetch_gate = gate = asyncio.Event()
    pending = asyncio.ensure_future(ask(control, PreloadAdapter("slow")))
    await asyncio.sleep(0.2)
    assert not pending.done()
    assert (await ask(control, ListAdapters())).adapters[0].status == "fetching"
    gate.set()
    assert isinstance(await pending, AdapterFetched)


async def test_load_without_adapter_sources(control):
    control.engine.sources = None
    reply = await ask(control, PreloadAdapter("alpha"))
    assert isinstance(reply, Error) and "serves no adapters" in reply.error


async def test_health(control):
    assert await ask(control, CheckHealth()) == Health(True)
    control.engine.healthy = False
    assert await ask(control, CheckHealth()) == Health(False)


# -- hostile input ----------------------------------------------------------------------------


async def test_bad_requests_get_errors_and_the_connection_keeps_serving(control):
    replies = await exchange(control.path, b"{not json\n", b'{"command": "reboot"}\n',
                             b'{"command": "load", "adapter_id": 7}\n', b"[1, 2]\n", b"\n",
                             b'{"command": "status"}\n')
    assert [r["type"] for r in replies] == ["error"] * 4 + ["status"]
    assert replies[0]["error"].startswith("malformed request")
    assert replies[1]["error"] == ("unknown command 'reboot'; the commands are status, "
                                   "adapters, load, health")
    assert "Expected `str`, got `int`" in replies[2]["error"]
    assert replies[3]["error"].startswith("invalid request")


async def test_an_oversized_line_is_refused_and_the_server_keeps_serving(control):
    replies = await exchange(control.path, b"x" * (MAX_REQUEST_BYTES + 10) + b"\n",
                             b'{"command": "status"}\n')
    assert replies == [{"type": "error",
                        "error": f"request line over {MAX_REQUEST_BYTES} bytes"}]
    assert isinstance(await ask(control, GetStatus()), Status)


async def test_a_failing_handler_answers_an_error(control):
    control.engine.stats_error = RuntimeError("boom")
    reply = await ask(control, GetStatus())
    assert reply == Error("internal error: boom")
    control.engine.stats_error = None
    assert isinstance(await ask(control, GetStatus()), Status)


async def test_a_last_line_without_newline_is_answered(control):
    assert [r["type"] for r in await exchange(control.path, b'{"command": "health"}')] == \
        ["health"]


# -- the socket file --------------------------------------------------------------------------


async def test_socket_mode_and_removal(tmp_path):
    path = tmp_path / "run" / "c.sock"
    server = ControlServer(str(path), FakeEngine(), SimpleNamespace(pids=[]))
    await server.start()
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o660
    await server.stop()
    assert not path.exists()
    await server.stop()  # twice is harmless


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path):
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = ControlServer(str(path), FakeEngine(), SimpleNamespace(pids=[]))
    await first.start()
    second = ControlServer(str(path), FakeEngine(), SimpleNamespace(pids=[]))
    with pytest.raises(OSError, match="another loraxd is answering"):
        await second.start()
    await second.stop()  # must not remove the first one's socket
    assert isinstance(await ask(first, GetStatus()), Status)
    await first.stop()


# -- loraxctl ---------------------------------------------------------------------------------


async def test_loraxctl_status(control, capsys):
    code, out, _ = await loraxctl_main(capsys, "--socket", control.path, "status")
    assert code == 0
    assert "fake/base (float32 on cpu)" in out and "4242" in out
    assert "2 running, 3 waiting" in out and "25.0% used" in out
    code, out, _ = await loraxctl_main(capsys, "--socket", control.path, "status", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model_id"] == "fake/base" and data["worker_pids"] == [4242]


async def test_loraxctl_load_and_adapters(control, capsys):
    code, out, _ = await loraxctl_main(capsys, "--socket", control.path, "load", "gamma")
    assert code == 0 and "local:gamma fetched and pinned" in out
    code, out, _ = await loraxctl_main(capsys, "--socket", control.path, "adapters")
    assert code == 0
    head, row = out.splitlines()
    assert head.split() == ["ADAPTER", "STATUS", "SLOT", "RUNNING", "WAITING", "PINNED"]
    assert row.split() == ["local:gamma", "loaded", "0", "0", "0", "yes"]
    code, out, _ = await loraxctl_main(capsys, "--json", "--socket", control.path, "adapters")
    assert json.loads(out)["adapters"][0]["key"] == "local:gamma"
    code, out, err = await loraxctl_main(capsys, "--socket", control.path, "load", "missing")
    assert code == 1 and out == "" and "local:missing" in err


async def test_loraxctl_health_exit_codes(control, capsys):
    assert await loraxctl_main(capsys, "--socket", control.path, "health") == (0, "healthy\n",
                                                                                "")
    control.engine.healthy = False
    assert await loraxctl_main(capsys, "--socket", control.path, "health") == \
        (1, "unhealthy\n", "")


async def test_loraxctl_socket_from_the_environment(control, capsys, monkeypatch):
    monkeypatch.setenv("LORAXD_CONTROL_SOCKET", control.path)
    code, out, _ = await loraxctl_main(capsys, "health", "--json")
    assert code == 0 and json.loads(out) == {"type": "health", "healthy": True}


def test_loraxctl_without_a_daemon(tmp_path, capsys):
    path = str(tmp_path / "absent.sock")
    assert loraxctl.main(["--socket", path, "status"]) == 1
    err = capsys.readouterr().err
    assert err == f"loraxctl: loraxd is not running: there is no control socket at {path}\n"
    assert loraxctl.main(["--socket", path, "status", "--json"]) == 1
    assert "no control socket" in json.loads(capsys.readouterr().out)["error"]


def test_loraxctl_on_a_dead_socket(tmp_path, capsys):
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    assert loraxctl.main(["--socket", str(path), "health"]) == 1
    assert "nothing answers on" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes every permission check")
def test_loraxctl_permission_denied(tmp_path, capsys):
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
        with pytest.raises(ControlError, match="did not answer within 0.2 s"):
            ControlClient(str(path), timeout=0.2).request(GetStatus())
    finally:
        sock.close()


def test_loraxctl_imports_only_the_protocol_and_the_client():
    import subprocess
    import sys
    code = ("import sys, loraxd.cli.loraxctl\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('loraxd'))))\n"
            "print(','.join(m for m in ('torch', 'aiohttp', 'zmq', 'numpy') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split(",") == ["loraxd", "loraxd.cli", "loraxd.cli.loraxctl",
                                 "loraxd.control", "loraxd.control.client", "loraxd.protocol",
                                 "loraxd.protocol.control"]
    assert out[1] == ""


def test_reply_round_trip():
    reply = Status("0.1.0", 1, "m", "float32", "cpu", 1.5, [2], True, 0, 0, 0.0, 0, 0, 4, 0)
    assert msgspec.json.decode(msgspec.json.encode(reply), type=Status) == reply
