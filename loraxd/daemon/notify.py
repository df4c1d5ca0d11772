"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, a no-op outside systemd.

The few messages loraxd sends: STATUS= (progress, then a one-line summary), READY=1,
RELOADING=1 with MONOTONIC_USEC= (systemd ≥ 253 requires it; older ones ignore it),
STOPPING=1, and WATCHDOG=1 while the engine's heartbeat is fresh.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# What systemd tells the main process only; a worker that inherited them would be ignored
# (NotifyAccess=main) or, worse, think it owns the watchdog.
SERVICE_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def sd_notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:  # systemd going away must not take the daemon with it
        log.warning("cannot notify systemd on %s: %s", address, exc)
        return False
    return True


def status(text: str) -> bool:
    return sd_notify("STATUS=" + " ".join(text.split()))  # one line: a newline ends it


def ready(summary: str) -> bool:
    return sd_notify("READY=1\nSTATUS=" + " ".join(summary.split()))


def reloading() -> bool:
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return sd_notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")


def stopping(text: str) -> bool:
    return sd_notify("STOPPING=1\nSTATUS=" + " ".join(text.split()))


def watchdog_interval_s(environ: Mapping[str, str] = os.environ,
                        pid: int | None = None) -> float | None:
    """WatchdogSec= of the unit, when it is meant for this process; None without one."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watchdog_pid and watchdog_pid != str(pid or os.getpid())):
        return None
    return usec / 1e6


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in SERVICE_ONLY_ENV}
