"""The HTTP door's settings (the [server] keys it reads), with the tree's defaults.

Read through one place so that a partial config (the HTTP tests build only the sections
they use) gets ServerConfig's defaults for the keys it leaves out. The snapshot in force is
`Frontend.settings`, which a reload replaces whole; readers look it up for each request or
connection and never keep it (see `door_settings` in service.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loraxd.config.tree import ServerConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}


@dataclass(frozen=True)
class DoorSettings:
    api_keys_file: str | None
    public_routes: tuple[str, ...]
    stream_write_timeout_s: float
    header_read_timeout_s: float
    body_read_timeout_s: float

    @classmethod
    def from_config(cls, config: Any) -> DoorSettings:
        server = config.server
        return cls(**{f.name: getattr(server, f.name, _DEFAULTS[f.name])
                      for f in dataclasses.fields(cls)})

