"""The fetch error every adapter source raises, and what an adapter directory must hold."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# What is worth downloading: the adapter, and the tokenizer and chat template it may ship.
ADAPTER_FILES = (CONFIG_FILE, *WEIGHT_FILES,
                 "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "chat_template.jinja", "chat_template.json")

_MAX_ID_CHARS = 200


class AdapterFetchError(Exception):
    """An adapter cannot be fetched or used; one line naming the adapter, the source and why.

    `denied`: the source refused the credentials used (another request's token may work)."""

    def __init__(self, source: str, adapter_id: str, reason: str, *, denied: bool = False):
        self.source = source
        self.adapter_id = adapter_id
        self.reason = " ".join(reason.split())
        self.denied = denied
        shown = adapter_id if len(adapter_id) <= _MAX_ID_CHARS else adapter_id[:_MAX_ID_CHARS] + "…"
        super().__init__(f"adapter {shown!r} (source {source}): {self.reason}")


def check_adapter_dir(source: str, adapter_id: str, path: Path,
                      roots: Iterable[Path | str] = ()) -> Path:
    """`path` if it holds a PEFT adapter (config and weights), else AdapterFetchError.

    `roots`: the files the worker will read (the config, the weights file it picks) must
    resolve inside one of them; a symlink that leads elsewhere is refused."""
    if not path.is_dir():
        raise AdapterFetchError(source, adapter_id, "the adapter directory does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterFetchError(source, adapter_id,
                                f"no {CONFIG_FILE} in the adapter directory (not a PEFT adapter)")
    weights = next((name for name in WEIGHT_FILES if (path / name).exists()), None)
    if weights is None or not (path / weights).is_file():
        raise AdapterFetchError(source, adapter_id,
                                f"no adapter weights ({' or '.join(WEIGHT_FILES)}) next to "
                                f"{CONFIG_FILE}")
    real_roots = [os.path.realpath(root) for root in roots]
    for name in (CONFIG_FILE, weights) if real_roots else ():
        real = os.path.realpath(path / name)
        if not any(os.path.commonpath((real, root)) == root for root in real_roots):
            raise AdapterFetchError(source, adapter_id,
                                    f"{name} resolves to a file outside the adapter "
                                    f"directories (symlink?); it is not read")
    return path
