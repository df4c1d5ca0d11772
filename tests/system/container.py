"""A throwaway systemd in a container: systemd-nspawn booted on an overlay of the host's /
whose upper layer is a tmpfs, in a private mount namespace, so the host is never modified
and everything vanishes when the container powers off.

One container at a time on a host (nspawn's cgroups have fixed names): `Container` takes a
lock first. `unavailable()` says why one cannot run here, for the tests to skip with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

LOCK_PATH = "/run/lock/loraxd-nspawn-test.lock"
_CGROUP_LEFTOVERS = [f"/sys/fs/cgroup/{tree}/{path}" for tree in ("systemd", "unified")
                     for path in ("payload/init.scope", "payload", "supervisor")]

# Runs in a private mount namespace: the overlay, the files put in it, then systemd.
_BOOT = r"""
set -eu
mount -t tmpfs tmpfs "$W/ovl"
mkdir -p "$W/ovl/upper" "$W/ovl/work" "$W/ovl/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/ovl/upper,workdir=$W/ovl/work" "$W/ovl/root"
R=$W/ovl/root
# Nothing of a loraxd installed on the host shows through.
rm -rf "$R/opt/loraxd" "$R/etc/loraxd" "$R/var/cache/loraxd" "$R/var/lib/loraxd" \
    "$R/etc/systemd/system/loraxd.service" "$R/etc/systemd/system/loraxd.service.d"
cp -a "$W/stage/." "$R/"
chmod --reference=/ "$R" && chown --reference=/ "$R"  # not the staging directory's mode
exec systemd-nspawn -q -D "$R" --register=no --keep-unit --private-network \
    --console=passive $BINDS --boot systemd.unit=multi-user.target
"""


def unavailable() -> str | None:
    """Why a container cannot boot here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare, overlay and systemd-nspawn)"
    for tool in ("systemd-nspawn", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container)"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed"
    return None


class Container:
    def __init__(self, stage: Path, binds: dict[str, str], *, lock_timeout_s: float = 900):
        """`stage`: files copied into the container's / before it boots; `binds`: host
        path -> container path, mounted read-only."""
        self.stage = stage
        self.binds = binds
        self.lock_timeout_s = lock_timeout_s
        self.work = Path(tempfile.mkdtemp(prefix="loraxd-nspawn-"))
        self.console = self.work / "console.log"
        self.leader: int | None = None
        self._nspawn: subprocess.Popen | None = None
        self._lock = None

    # -- life ---------------------------------------------------------------------------------

    def boot(self, timeout_s: float = 60) -> None:
        """Raises RuntimeError (with the console's tail) when systemd does not come up."""
        self._take_lock()
        _remove_cgroup_leftovers()
        (self.work / "ovl").mkdir()
        os.symlink(self.stage, self.work / "stage")
        binds = " ".join(f"--bind-ro={src}:{dst}" for src, dst in self.binds.items())
        self._nspawn = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _BOOT],
            env={**os.environ, "W": str(self.work), "BINDS": binds},
            stdin=subprocess.DEVNULL, stdout=self.console.open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.leader is None:
            self._check_alive()
            self.leader = _find_leader(self._nspawn.pid)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd did not start:\n{self.tail()}")
            time.sleep(0.05)
        while self.run("test", "-S", "/run/systemd/private", check=False).returncode:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd has no bus:\n{self.tail()}")
            time.sleep(0.05)
        # basic.target, not the whole boot: a slow D-Bus or logind (seen on loaded hosts)
        # holds multi-user.target back but nothing here needs them.
        while self.run("systemctl", "is-active", "--quiet", "basic.target",
                       check=False).returncode:
            if time.monotonic() > deadline:
                jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
                raise RuntimeError(f"the container did not reach basic.target:\n{jobs}\n"
                                   f"{self.tail()}")
            time.sleep(0.2)

    def poweroff(self) -> None:
        try:
            if self._nspawn is not None and self._nspawn.poll() is None:
                if self.leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
                try:
                    self._nspawn.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self._nspawn.pid, signal.SIGKILL)
                    self._nspawn.wait(10)
        finally:
            _remove_cgroup_leftovers()
            shutil.rmtree(self.work, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- inside -------------------------------------------------------------------------------

    def command(self, *argv: str, user: str | None = None, only_net: bool = False) -> list[str]:
        """argv run in the container (as `user`), or only in its network (host files)."""
        ns = ["-n"] if only_net else ["-m", "-u", "-i", "-n", "-p"]
        if user is not None:
            argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                    "--reset-env", *argv)
        return ["nsenter", "-t", str(self.leader), *ns, "--", *argv]

    def run(self, *argv: str, user: str | None = None, only_net: bool = False,
            check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(self.command(*argv, user=user, only_net=only_net),
                             capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}\n"
                                 f"{out.stderr}")
        return out

    def write(self, path: str, text: str) -> None:
        subprocess.run(self.command("sh", "-c", f"mkdir -p \"$(dirname {path})\" && "
                                    f"cat > {path}"), input=text, text=True, check=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    # -- helpers ------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
        self._lock = open(LOCK_PATH, "w")
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError("another systemd container test holds "
                                       f"{LOCK_PATH}") from None
                time.sleep(1)

    def _check_alive(self) -> None:
        if self._nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited ({self._nspawn.returncode}):\n"
                               f"{self.tail()}")


def _find_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1: a descendant whose last NSpid is 1 and that runs systemd."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines()
                      if line.startswith("NSpid:")), [])
        if pid != nspawn_pid and nspid[-1:] == ["1"] and comm == "systemd":
            return pid
        todo.extend(int(c) for c in children)
    return None


def _remove_cgroup_leftovers() -> None:
    for path in _CGROUP_LEFTOVERS:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only empty ones go
