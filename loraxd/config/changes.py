"""What a reload changes: the settings a reload applies live, and those that wait for a restart.

A reload reads the configuration again from the same sources as at start (same flags, same
environment, the file as it is now). The tree the daemon then runs with takes the file's
reloadable settings and keeps every restart-only setting as it was started; that tree is
validated whole (cross-key rules too), so a reload can never put the running daemon into a
state its start would have refused.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from loraxd.config.tree import SECTION_NAMES, Config, ConfigError, reloadable


@dataclass(frozen=True)
class Change:
    key: str  # "section.name"
    old: typing.Any
    new: typing.Any


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # what to run with from now on
    applied: tuple[Change, ...]  # reloadable settings that change now
    pending: tuple[Change, ...]  # restart-only settings whose new value waits for a restart


def settings(config: Config) -> typing.Iterator[tuple[str, str, typing.Any]]:
    """(section, name, value) of every setting, in the tree's order."""
    for section in SECTION_NAMES:
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            yield section, f.name, getattr(part, f.name)


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    """`running`: the tree in force; `loaded`: the tree just read. Raises ConfigError when
    the reloadable settings of `loaded` do not fit the restart-only ones in force."""
    merged: dict[str, dict[str, typing.Any]] = {section: {} for section in SECTION_NAMES}
    applied, pending = [], []
    for (section, name, old), (_, _, new) in zip(settings(running), settings(loaded)):
        live = reloadable(section, name)
        merged[section][name] = new if live else old
        if old != new:
            (applied if live else pending).append(Change(f"{section}.{name}", old, new))
    config = Config(**{section: dataclasses.replace(getattr(running, section), **values)
                       for section, values in merged.items()})
    try:
        config = Config.from_dict(config.to_dict())  # every rule, on the tree we will run
    except ConfigError as exc:
        raise ConfigError(f"{exc} (settings that need a restart keep their running values "
                          "until then)") from None
    return ReloadPlan(config, tuple(applied), tuple(pending))


def pending_restart(running: Config, loaded: Config) -> dict[str, typing.Any]:
    """Restart-only settings whose value in `loaded` differs from the one in force."""
    return {f"{section}.{name}": new
            for (section, name, old), (_, _, new) in zip(settings(running), settings(loaded))
            if old != new and not reloadable(section, name)}
