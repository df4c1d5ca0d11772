"""`loraxctl`: control a running loraxd over its control socket.

    loraxctl status | health | version | workers
    loraxctl adapters [list] | adapters load|pin|unpin|unload ADAPTER_ID [--source S]
    loraxctl requests [list] | requests cancel ID
    loraxctl drain [--wait [S]] | resume | reload
    loraxctl config show | config check
    loraxctl log-level [LEVEL]

Tables by default, `--json` for scripts. Exit status: 0 done; 1 the daemon refused or
failed the command (an error reply, unhealthy, permission denied); 2 usage; 69
(EX_UNAVAILABLE) the daemon cannot be reached. The socket: `--socket PATH`, else
$LORAXD_SOCKET, else /run/loraxd/control.sock (or, when that is absent, the daemon's
default for this user). Imports only the protocol, the client and the config's path rules.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import msgspec

from loraxd import __version__
from loraxd.cli import render
from loraxd.config.tree import default_paths
from loraxd.control.client import ControlClient, ControlError, Unreachable
from loraxd.protocol.control import (AdapterState, CancelRequest, CheckConfig, CheckHealth,
                                     Drain, DrainState, Error, GetStatus, GetVersion, Health,
                                     ListAdapters, ListRequests, ListWorkers, LoadAdapter,
                                     Reload, Reply, Resume, SetLogLevel, ShowConfig,
                                     UnloadAdapter, UnpinAdapter, Version)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 69
DEFAULT_SOCKET = "/run/loraxd/control.sock"
SOCKET_ENV = "LORAXD_SOCKET"
LEVELS = ("debug", "info", "warning", "error")
_TIMEOUT_S = 10.0
_SLOW_TIMEOUT_S = {"health": 60.0, "reload": 60.0}  # a health probe may take a step
_DRAIN_WAIT_S = 300.0  # `drain --wait` without a number


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"the control socket (${SOCKET_ENV}, else {DEFAULT_SOCKET})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the reply as JSON")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for the reply")
    parser = argparse.ArgumentParser(
        prog="loraxctl", parents=[common], description="Control a running loraxd.",
        epilog="exit status: 0 done, 1 refused or failed, 2 usage, 69 daemon unreachable")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], help=text, description=text)

    command(commands, "status", "the daemon's state, model, load and adapters")
    command(commands, "health", "exit 0 when the daemon takes and generates requests, else 1")
    command(commands, "version", "loraxctl's and the daemon's versions")
    command(commands, "workers", "each worker rank: pid, device, memory, state")

    adapters = command(commands, "adapters", "list, load, pin, unpin or unload adapters")
    actions = adapters.add_subparsers(dest="action", metavar="ACTION")
    command(actions, "list", "every adapter the daemon knows, and where it is")
    for name, text in (("load", "fetch an adapter and load it into a slot"),
                       ("pin", "load an adapter and keep it in its slot"),
                       ("unpin", "let a pinned adapter rotate out like any other"),
                       ("unload", "free an adapter's slot (refused while requests use it)")):
        sub = command(actions, name, text)
        sub.add_argument("adapter_id", metavar="ADAPTER_ID")
        sub.add_argument("--source", choices=("hub", "local", "s3"), default=None,
                         help="default: the daemon's adapters.adapter_source")
        if name in ("load", "pin"):
            sub.add_argument("--wait", type=float, default=60.0, metavar="S",
                             help="seconds to wait until it is loaded (default 60)")

    requests = command(commands, "requests", "list or cancel the requests in the engine")
    actions = requests.add_subparsers(dest="action", metavar="ACTION")
    command(actions, "list", "the running and waiting requests")
    cancel = command(actions, "cancel", "end a request now (its client gets an error)")
    cancel.add_argument("request_id", type=int, metavar="ID")

    drain = command(commands, "drain", "take no new generation requests (503); running "
                    "ones finish")
    drain.add_argument("--wait", type=float, nargs="?", const=_DRAIN_WAIT_S, default=0.0,
                       metavar="S", help="wait until none is left (at most S seconds, "
                       f"default {_DRAIN_WAIT_S:g}); exit 1 if some still run")
    command(commands, "resume", "take new requests again after a drain")
    command(commands, "reload", "read and validate the configuration, apply what can change "
            "live; exit 1 (nothing changed) when it is not valid")

    config = command(commands, "config", "the configuration in force, or a check of the file")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(actions, "show", "every setting in force; changed ones marked pending")
    command(actions, "check", "validate the configuration as a reload would; apply nothing")

    level = command(commands, "log-level", "show or set the log level of the daemon and its "
                    "workers (until the next reload)")
    level.add_argument("level", nargs="?", choices=LEVELS, metavar="LEVEL",
                       help="one of " + ", ".join(LEVELS))
    return parser


def _request(args: argparse.Namespace):
    command, action = args.command, getattr(args, "action", None)
    if command == "adapters":
        if action in (None, "list"):
            return ListAdapters()
        if action in ("load", "pin"):
            return LoadAdapter(args.adapter_id, args.source, pin=action == "pin",
                               wait_s=args.wait)
        return {"unpin": UnpinAdapter, "unload": UnloadAdapter}[action](args.adapter_id,
                                                                         args.source)
    if command == "requests":
        return CancelRequest(args.request_id) if action == "cancel" else ListRequests()
    if command == "config":
        return ShowConfig() if action == "show" else CheckConfig()
    if command == "drain":
        return Drain(wait_s=args.wait)
    if command == "log-level":
        return SetLogLevel(args.level)
    return {"status": GetStatus, "health": CheckHealth, "version": GetVersion,
            "workers": ListWorkers, "resume": Resume, "reload": Reload}[command]()


def _timeout(args: argparse.Namespace, request) -> float:
    if getattr(args, "timeout", None):
        return args.timeout
    wait = getattr(request, "wait_s", 0.0)
    return wait + _TIMEOUT_S if wait else _SLOW_TIMEOUT_S.get(args.command, _TIMEOUT_S)


def socket_path(args: argparse.Namespace, environ=os.environ) -> str:
    chosen = getattr(args, "socket", None) or environ.get(SOCKET_ENV)
    if chosen:
        return chosen
    if os.path.exists(DEFAULT_SOCKET) or os.geteuid() == 0:
        return DEFAULT_SOCKET
    mine = os.path.join(default_paths(environ, os.geteuid())[0], "control.sock")
    return mine if os.path.exists(mine) else DEFAULT_SOCKET


def _outcome(reply: Reply, request) -> tuple[int, str | None]:
    """The exit status, and why when it is not 0."""
    if isinstance(reply, Error):
        return EXIT_REFUSED, reply.error
    if isinstance(reply, Health) and not reply.healthy:
        return EXIT_REFUSED, None
    if isinstance(reply, AdapterState) and reply.adapter.status != "loaded":
        return EXIT_REFUSED, (f"adapter {reply.adapter.key} is still {reply.adapter.status} "
                              f"after {request.wait_s:g} s")
    if isinstance(reply, DrainState) and isinstance(request, Drain) and request.wait_s > 0 \
            and reply.num_requests:
        return EXIT_REFUSED, (f"{reply.num_requests} request(s) still running after "
                              f"{request.wait_s:g} s")
    return EXIT_OK, None


def _print_error(message: str, as_json: bool, **extra) -> None:
    if as_json:
        print(json.dumps({"type": "error", "error": message, **extra}))
    else:
        print(f"loraxctl: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help: 0; a usage error: 2, after argparse's message
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    as_json = getattr(args, "json", False)
    request = _request(args)
    try:
        reply: Reply = ControlClient(socket_path(args), _timeout(args, request)).request(request)
    except ControlError as exc:
        if isinstance(request, GetVersion) and not as_json:
            print(f"loraxctl {__version__}")
        unreachable = isinstance(exc, Unreachable)
        _print_error(str(exc), as_json, unreachable=unreachable)
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    code, why = _outcome(reply, request)
    if isinstance(reply, Error):
        _print_error(reply.error, as_json)
        return code
    if as_json:
        data = msgspec.to_builtins(reply)
        if isinstance(reply, Version):
            data["loraxctl"] = __version__
        print(json.dumps(data, indent=2))
    elif isinstance(reply, Version):
        print(render.version(reply, __version__))
    else:
        print(render.SHOW[type(reply)](reply))
    if why:
        print(f"loraxctl: {why}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
