"""Read an HF model directory's generation_config.json and *.safetensors (config.json:
loraxd.worker.models).

Weights come one tensor at a time (`iter_weights`), so a model never holds two full copies
of its state while it loads. Each comes as a `CheckpointTensor`, read from the file only in
the part a rank indexes: a rank of N reads 1/N of each column-parallel, row-parallel and
vocab-parallel tensor (safetensors' `get_slice` copies just those bytes out of the mapped
file), and whole only what every rank holds (norms, row-parallel biases).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
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


# bytes per element of safetensors' dtype names (the whole tensor's size, for the logs)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1}


class CheckpointTensor:
    """One tensor of a weight file, read only where it is indexed: `t[rows]`, `t[:, cols]`,
    `t[()]` for all of it; each read is a CPU tensor in the file's dtype. `bytes_read` counts
    what was copied out. Valid until the next tensor is asked of `iter_weights`."""

    def __init__(self, part):
        self._part = part
        self.shape = tuple(part.get_shape())
        self.num_bytes = math.prod(self.shape) * _DTYPE_BYTES.get(part.get_dtype(), 0)
        self.bytes_read = 0

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self._part[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


@dataclass
class ReadCount:
    """What `iter_weights` handed out (num_bytes) and what of it was read (bytes_read)."""

    num_bytes: int = 0
    bytes_read: int = 0


def iter_weights(model_dir: str | Path, count: ReadCount | None = None
                 ) -> Iterator[tuple[str, CheckpointTensor]]:
    """Yield (name, tensor) for every tensor of every weight file, none read yet; `count`
    adds up each tensor's bytes and the bytes read of it once the next is asked for."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = CheckpointTensor(f.get_slice(name))
                yield name, tensor
                if count is not None:
                    count.num_bytes += tensor.num_bytes
                    count.bytes_read += tensor.bytes_read
