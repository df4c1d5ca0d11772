"""sd_notify in a few lines, the watchdog fed only by a fresh heartbeat, and the log shapes."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import sys
import time

import pytest

from loraxd import logs
from loraxd.daemon import notify
from loraxd.daemon.watchdog import Watchdog


@pytest.fixture
def systemd(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's notify socket; returns a reader."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    def received() -> list[str]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096).decode())
            except BlockingIOError:
                return out
    yield received
    sock.close()


def test_messages(systemd):
    assert notify.status("loading\nthe model")
    assert notify.ready("serving m")
    assert notify.reloading()
    assert notify.stopping("draining 2")
    status, ready, reloading, stopping = systemd()
    assert status == "STATUS=loading the model"  # one line, whatever it was given
    assert ready == "READY=1\nSTATUS=serving m"
    first, second = reloading.split("\n")
    assert first == "RELOADING=1" and second.startswith("MONOTONIC_USEC=")
    usec = int(second.removeprefix("MONOTONIC_USEC="))
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now - usec < 5_000_000
    assert stopping == "STOPPING=1\nSTATUS=draining 2"


def test_outside_systemd_it_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.sd_notify("READY=1")


def test_a_vanished_notify_socket_does_not_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not notify.sd_notify("READY=1")


def test_watchdog_interval():
    pid = os.getpid()
    assert notify.watchdog_interval_s({}, pid) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid) == 30.0
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": str(pid)},
                                      pid) == 6.0
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": "1"},
                                      pid) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "junk"}, pid) is None


def test_workers_do_not_inherit_what_is_meant_for_the_main_process():
    env = notify.child_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1",
                                    "WATCHDOG_PID": "2", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


class FakeEngine:
    def __init__(self):
        self.stalled = 0.0
        self.probes = 0

    def stalled_for(self) -> float:
        return self.stalled

    async def health(self) -> bool:
        self.probes += 1
        return True


async def test_the_watchdog_pings_only_while_the_heartbeat_is_fresh(systemd, caplog):
    engine = FakeEngine()
    dog = Watchdog(engine, interval_s=8.0)
    assert (dog.tick_s, dog.stale_after_s) == (2.0, 4.0)
    assert dog.tick()
    await asyncio.sleep(0)
    assert engine.probes == 1  # an idle engine is probed, so a hung worker shows
    engine.stalled = 4.5
    assert not dog.tick() and not dog.tick()
    assert sum("no more watchdog pings" in r.getMessage() for r in caplog.records) == 1
    engine.stalled = 0.0
    assert dog.tick()
    assert systemd() == ["WATCHDOG=1", "WATCHDOG=1"]


async def test_the_watchdog_loop_runs_and_stops(systemd):
    engine = FakeEngine()
    task = asyncio.ensure_future(Watchdog(engine, interval_s=0.2).run())
    await asyncio.sleep(0.18)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(systemd()) >= 3


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("loraxd.engine.engine", logging.WARNING, __file__, 1,
                               "request %d failed", (7,), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_request_id():
    entry = json.loads(logs.JsonFormatter("worker0").format(_record(request_id=7)))
    assert entry["message"] == "request 7 failed" and entry["request_id"] == 7
    assert entry["process"] == "worker0" and entry["level"] == "warning"
    assert "request_id" not in json.loads(logs.JsonFormatter("loraxd").format(_record()))


def test_journal_lines_have_a_priority_and_no_timestamp():
    line = logs.JournalFormatter("loraxd").format(_record())
    assert line == "<4>loraxd loraxd.engine.engine: request 7 failed"


def test_the_journal_is_recognised_by_its_stream(monkeypatch, tmp_path):
    stream = open(tmp_path / "err", "w")
    monkeypatch.setattr(sys, "stderr", stream)
    st = os.fstat(stream.fileno())
    assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not logs.stderr_is_journal({"JOURNAL_STREAM": "1:2"})
    assert not logs.stderr_is_journal({})
    stream.close()


def test_levels():
    assert logs.level_number("debug") == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.level_number("loud")


def test_configure_json_catches_uncaught_exceptions(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    root = logging.getLogger()
    hook, handlers, level = sys.excepthook, root.handlers[:], root.level
    try:
        logs.configure(json_output=True, level="info", process="worker3")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook = hook
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    [line] = buffer.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["process"] == "worker3" and "RuntimeError: boom" in entry["exception"]
