"""What /proc says about a worker process: its scheduler state and its resident memory."""
from __future__ import annotations

_STATES = {"R": "running", "S": "running", "D": "running", "I": "running",
           "T": "stopped", "t": "stopped", "Z": "zombie", "X": "exited"}


def process_state(pid: int) -> str | None:
    """running, stopped (SIGSTOP or a tracer), zombie, exited; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    code = stat[stat.rindex(")") + 2:].split(" ", 1)[0]  # the name in (…) may hold spaces
    return _STATES.get(code, "running")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
