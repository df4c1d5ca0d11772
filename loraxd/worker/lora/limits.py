"""What an adapter may be, checked before its weights are read.

Adapters are untrusted input. Every file read (adapter_config.json, the weights) is resolved
(symlinks, `..`) and must be a regular file inside one of `roots`, the directories the daemon
serves adapters from: a weights file linked to a file elsewhere is refused, not read. The
rank is checked from the config, the size from the file and, for safetensors, from the
header's tensor shapes, so nothing over a limit is ever loaded.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass

from loraxd.worker.lora.errors import AdapterIncompatible

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 8 << 20  # a rank-64 all-linear adapter of an 80-layer model: ~200 kB
MAX_TENSORS = 1 << 16
MAX_PATTERN_KEYS = 2048  # rank_pattern / alpha_pattern entries (EVA writes one per module)

# Bytes per element of each safetensors dtype; unknown ones count as 8.
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class AdapterLimits:
    """None / empty: no limit (direct use of the loader, tests)."""

    max_rank: int | None = None
    max_bytes: int | None = None  # the weights file on disk, and its tensors in memory
    roots: tuple[str, ...] = ()  # resolved directories every file read must lie in

    def checked_file(self, path: str, name: str, max_bytes: int | None) -> str:
        """The resolved path of `path`, to open instead of it; raises FileNotFoundError when
        it does not exist, AdapterIncompatible when it may not be read."""
        real = os.path.realpath(path)
        if self.roots and not any(os.path.commonpath((real, root)) == root
                                  for root in self.roots):
            log.warning("adapter file %s resolves to %s, outside %s", path, real, self.roots)
            raise AdapterIncompatible(f"{name} resolves to a file outside the adapter "
                                      f"directories (symlink?); it is not read")
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterIncompatible(f"{name} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise AdapterIncompatible(f"{name} is {_size(info.st_size)}, more than "
                                      f"{_limit_name(name)} ({_size(max_bytes)})")
        return real

    def check_config(self, config: dict) -> None:
        """Ranks and the number of patterns, from a config `_check_config` accepted."""
        for field in ("rank_pattern", "alpha_pattern"):
            if len(config.get(field) or {}) > MAX_PATTERN_KEYS:
                raise AdapterIncompatible(f"adapter_config.json: {field} has more than "
                                          f"{MAX_PATTERN_KEYS} entries")
        if self.max_rank is None:
            return
        ranks = [("r", config.get("r", 8))]
        ranks += [(f"rank_pattern[{key!r}]", r)
                  for key, r in (config.get("rank_pattern") or {}).items()]
        for what, r in ranks:
            if isinstance(r, int) and r > self.max_rank:
                raise AdapterIncompatible(f"adapter_config.json: {what}={r} is above this "
                                          f"server's max_lora_rank ({self.max_rank})")

    def check_safetensors(self, real_path: str, item_bytes: int) -> None:
        """The tensors' size in memory from the file's header, before any is loaded."""
        with open(real_path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < size <= MAX_HEADER_BYTES:
                raise AdapterIncompatible("adapter_model.safetensors: no valid safetensors "
                                          f"header (at most {_size(MAX_HEADER_BYTES)})")
            try:
                header = json.loads(f.read(size))
                tensors = [(v["dtype"], v["shape"]) for k, v in header.items()
                           if k != "__metadata__"]
                numels = [(dtype, _numel(shape)) for dtype, shape in tensors]
            except (ValueError, TypeError, KeyError, AttributeError):
                raise AdapterIncompatible("adapter_model.safetensors: unreadable header") \
                    from None
        if len(numels) > MAX_TENSORS:
            raise AdapterIncompatible(f"adapter_model.safetensors holds {len(numels)} tensors "
                                      f"(at most {MAX_TENSORS})")
        self.check_memory(sum(n * max(_ITEM_BYTES.get(str(dtype), 8), item_bytes)
                              for dtype, n in numels))

    def check_memory(self, num_bytes: int) -> None:
        if self.max_bytes is not None and num_bytes > self.max_bytes:
            raise AdapterIncompatible(f"the adapter's tensors take {_size(num_bytes)} in memory, "
                                      f"more than max_adapter_bytes ({_size(self.max_bytes)})")


def _numel(shape) -> int:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    n = 1
    for d in shape:
        n *= d
    return n


def _limit_name(name: str) -> str:
    return "the largest config file" if name.endswith(".json") else "max_adapter_bytes"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"
