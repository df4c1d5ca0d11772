"""LoRAX launcher flags that are no loraxd setting: each is recognized, so that a LoRAX
command line or environment is never half-understood, and refused with its reason unless the
value given asks for what loraxd already does (`TRUST_REMOTE_CODE=false`).

Stdlib only, like the loader that calls it.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loraxd.config.tree import ConfigError

_FALSE = ("", "0", "false", "no", "off")


def _no(value: str) -> bool:
    return value.strip().lower() in _FALSE


@dataclass(frozen=True)
class LoraxOnlyFlag:
    name: str  # the flag without dashes, underscored
    takes_value: bool  # `--ngrok-edge EDGE`; else a switch (`--ngrok`)
    reason: str  # why a value other than the accepted ones is refused
    holds: Callable[[str], bool] = _no  # values that ask for what loraxd does anyway

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.name.upper()

    @property
    def dest(self) -> str:
        return "lorax_only_" + self.name


_NGROK = "ngrok tunnels are not built in: run a tunnel or proxy in front of loraxd"

LORAX_ONLY_FLAGS = (
    LoraxOnlyFlag("trust_remote_code", False, "loraxd runs only its own model code, never code "
                  "from the Hub"),
    LoraxOnlyFlag("disable_custom_kernels", False, "", holds=lambda value: True),
    LoraxOnlyFlag("ngrok", False, _NGROK),
    LoraxOnlyFlag("ngrok_authtoken", True, _NGROK),
    LoraxOnlyFlag("ngrok_edge", True, _NGROK),
)


def add_lorax_only_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "LoRAX flags refused here (unless the value asks for what loraxd does anyway)")
    for f in LORAX_ONLY_FLAGS:
        text = (f.reason or "accepted: loraxd runs no custom kernels") + f" [env {f.env}]"
        if f.takes_value:
            group.add_argument(f.flag, dest=f.dest, metavar="VALUE", help=text.replace("%", "%%"))
        else:
            group.add_argument(f.flag, dest=f.dest, action="store_const", const="true",
                               help=text.replace("%", "%%"))


def refuse_lorax_only(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Raise ConfigError for the first LoRAX-only flag or variable asking for something
    loraxd does not do."""
    given = vars(args)
    for f in LORAX_ONLY_FLAGS:
        if f.dest in given and not f.holds(given[f.dest]):
            shown = f" {given[f.dest]}" if f.takes_value else ""
            raise ConfigError(f"command line: {f.flag}{shown}: {f.reason}")
        if f.env in environ and not f.holds(environ[f.env]):
            raise ConfigError(f"environment: {f.env} = {environ[f.env]}: {f.reason}")
