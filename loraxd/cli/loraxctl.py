"""`loraxctl`: ask a running loraxd over its control socket.

    loraxctl status              version, model, workers, load, KV cache, adapters
    loraxctl adapters            every adapter the daemon knows, and where it is
    loraxctl load ADAPTER_ID     fetch, load and pin an adapter (--source hub|local|s3)
    loraxctl health              exit 0 when the daemon generates, else 1

`--json` prints the daemon's reply as JSON. Exit status 1 when the daemon answers with an
error, is unhealthy, or cannot be reached. Imports only the protocol and the client.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import msgspec

from loraxd.control.client import ControlClient, ControlError
from loraxd.protocol.control import (AdapterFetched, AdapterInfo, AdapterList, CheckHealth,
                                     Error, GetStatus, Health, ListAdapters, PreloadAdapter,
                                     Reply, Status)

DEFAULT_SOCKET = "/run/loraxd/control.sock"
SOCKET_ENV = "LORAXD_CONTROL_SOCKET"
# A health check may run a one-token probe (up to 30 s); a load may download.
_TIMEOUTS_S = {"status": 10.0, "adapters": 10.0, "health": 60.0, "load": 900.0}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"the control socket (${SOCKET_ENV}, else {DEFAULT_SOCKET})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the reply as JSON")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for the reply")
    parser = argparse.ArgumentParser(prog="loraxctl", parents=[common],
                                     description="Ask a running loraxd.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[common], help="the daemon's state")
    commands.add_parser("adapters", parents=[common], help="the adapters and their slots")
    load = commands.add_parser("load", parents=[common],
                               help="fetch, load and pin an adapter")
    load.add_argument("adapter_id", metavar="ADAPTER_ID")
    load.add_argument("--source", default=None, help="hub, local or s3 (default: the "
                      "daemon's adapters.adapter_source)")
    commands.add_parser("health", parents=[common], help="exit 0 when healthy, else 1")
    return parser


def _request(args: argparse.Namespace):
    if args.command == "load":
        return PreloadAdapter(args.adapter_id, args.source)
    return {"status": GetStatus, "adapters": ListAdapters, "health": CheckHealth}[args.command]()


# -- human output ------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"
    return f"{days}d {text}" if days else text


def _show_status(r: Status) -> str:
    rows = [("model", f"{r.model_id} ({r.dtype} on {r.device})"),
            ("pid", str(r.pid)),
            ("uptime", _duration(r.uptime_s)),
            ("workers", " ".join(map(str, r.worker_pids)) or "none running"),
            ("serving", "yes" if r.serving else "no (workers restarting)"),
            ("requests", f"{r.num_running} running, {r.num_waiting} waiting"),
            ("kv cache", f"{100 * r.kv_cache_usage:.1f}% used"),
            ("steps", str(r.num_steps)),
            ("adapters", f"{r.num_adapters_loaded} loaded in {r.num_adapter_slots} slots, "
                         f"{r.num_adapters_known} known")]
    return "\n".join([f"loraxd {r.version}"] + [f"{k:<10} {v}" for k, v in rows])


def _adapter_rows(adapters: list[AdapterInfo]) -> str:
    head = ("ADAPTER", "STATUS", "SLOT", "RUNNING", "WAITING", "PINNED")
    rows = [head] + [(a.key, a.status, "-" if a.slot < 0 else str(a.slot), str(a.num_running),
                      str(a.num_waiting), "yes" if a.pinned else "no") for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def _show_adapters(r: AdapterList) -> str:
    return _adapter_rows(r.adapters) if r.adapters else "no adapters"


def _show_fetched(r: AdapterFetched) -> str:
    a = r.adapter
    where = f" in slot {a.slot}" if a.slot >= 0 else ""
    return f"adapter {a.key} fetched and pinned: {a.status}{where}"


def _show_health(r: Health) -> str:
    return "healthy" if r.healthy else "unhealthy"


_SHOW = {Status: _show_status, AdapterList: _show_adapters, AdapterFetched: _show_fetched,
         Health: _show_health}


# -- main --------------------------------------------------------------------------------------


def _fail(message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"type": "error", "error": message}))
    else:
        print(f"loraxctl: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    path = getattr(args, "socket", None) or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    timeout = getattr(args, "timeout", None) or _TIMEOUTS_S[args.command]
    try:
        reply: Reply = ControlClient(path, timeout).request(_request(args))
    except ControlError as exc:
        return _fail(str(exc), as_json)
    if isinstance(reply, Error):
        return _fail(reply.error, as_json)
    if as_json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
    else:
        print(_SHOW[type(reply)](reply))
    return 1 if isinstance(reply, Health) and not reply.healthy else 0


if __name__ == "__main__":
    sys.exit(main())
