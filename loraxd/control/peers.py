"""Who may use the control socket, checked on each connection from its peer credentials.

The socket's mode (0660) already keeps others out; SO_PEERCRED checks again what the
kernel says about the connecting process, so a socket file made wider by mistake, or a
descriptor handed to someone else, still lets in only: root, the daemon's own user, and
members of the socket file's group (loraxd under the shipped unit).
"""
from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return Peer(pid, uid, gid)


def _groups_of(peer: Peer) -> set[int]:
    """The peer process's groups (/proc), else its user's groups in the group database (when
    the daemon cannot see other users' processes, e.g. under ProtectProc=invisible)."""
    try:
        with open(f"/proc/{peer.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]} | {peer.gid}
    except (OSError, ValueError):
        pass
    try:
        return set(os.getgrouplist(pwd.getpwuid(peer.uid).pw_name, peer.gid))
    except (KeyError, OSError):
        return {peer.gid}


class PeerPolicy:
    def __init__(self, group: int, owner: int | None = None):
        self.group = group  # the socket file's group
        self.owner = os.geteuid() if owner is None else owner

    def refusal(self, peer: Peer) -> str | None:
        """None when the peer may use the socket, else why not."""
        if peer.uid in (0, self.owner) or self.group in _groups_of(peer):
            return None
        return (f"permission denied: uid {peer.uid} is neither root, the daemon's user, nor "
                f"in group {_group_name(self.group)}")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
