"""Cut a whole LoRA adapter to one tensor-parallel rank, like its base weights.

Column-parallel modules (q, k, v, gate, up) keep A [r, in] whole and the rank's rows of
B [out, r]: the rank's output columns of B A x are then its own. Row-parallel modules
(o, down) keep the rank's columns of A and B whole: each rank's B (A_i x_i) is a partial
sum that the base layer's all-reduce completes, so LoRA adds no collective.

Adapters are read, checked against the whole model's shapes and merged whole (a TIES or
DARE merge prunes over the whole tensor), and only then cut, so every rank installs the
same adapter's part.
"""
from __future__ import annotations

from loraxd.worker.lora.peft_format import LoraAdapter


def shard_adapter(adapter: LoraAdapter, parts: dict[str, tuple[str, slice]],
                  world_size: int) -> LoraAdapter:
    """`parts`: module -> ("out", rows of B) or ("in", columns of A), as
    `ModelShard.lora_parts()` gives; with one rank the adapter itself."""
    if world_size == 1:
        return adapter
    weights, num_bytes = {}, 0
    for (layer_idx, module), (a, b) in adapter.weights.items():
        side, cut = parts[module]
        if side == "out":
            b = b[cut].contiguous()
        else:
            a = a[:, cut].contiguous()
        weights[(layer_idx, module)] = (a, b)
        num_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return LoraAdapter(weights=weights, ranks=dict(adapter.ranks), num_bytes=num_bytes)
