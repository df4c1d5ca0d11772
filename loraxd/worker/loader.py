"""Read an HF model directory's generation_config.json and *.safetensors (config.json:
loraxd.worker.models).

Weights come one tensor at a time (`iter_weights`), so a model never holds two full copies
of its state while it loads: each tensor is sliced for this rank, cast and placed at once.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def eos_token_ids(model_dir: str | Path, config: dict) -> list[int]:
    """The EOS ids from generation_config.json, else config.json; an int or a list there."""
    path = Path(model_dir) / "generation_config.json"
    value = None
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files: the sharded index's, else model.safetensors, else every *.safetensors."""
    root = Path(model_dir)
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors weights in the model directory")
    return files


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every weight file, on the CPU."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
