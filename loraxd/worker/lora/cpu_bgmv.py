"""TorchLoraOp's decode path on a CPU with our kernels: one `loraxd_cpu::lora_bgmv` call per
(layer, group) for every token of the step's few-token adapters (cpu_kernels/lora_bgmv.cpp),
which reads each token's A and B once, where the pool keeps them.

A plan is an int64 tensor [n, 2 + modules]: per token with an adapter that targets the group
in that layer, (token, slot, rank of each module of the group; 0: untargeted), built once per
step and shared by the layers whose ranks are the same (ops._by_layer_ranks).
"""
from __future__ import annotations

import torch

from loraxd.worker import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)


def usable(storage) -> bool:
    """The kernel covers this pool: on the CPU, fp32 or bf16, and the library is loaded."""
    a = storage.stores[0][next(iter(storage.specs))].a
    return (storage.device.type == "cpu" and a.dtype in DTYPES
            and cpu_kernels.enable() is None)


def plan(ranks: dict[int, tuple[int, ...]], tokens: list[tuple[int, int]]
         ) -> torch.Tensor | None:
    """One layer's plan for a group, `ranks`: each slot's module ranks there; `tokens`:
    (token, slot) of the tokens the kernel serves. None: no token's adapter targets it."""
    rows = [(t, s, *ranks[s]) for t, s in tokens if sum(ranks[s])]
    return torch.tensor(rows, dtype=torch.long) if rows else None


def apply(plan: torch.Tensor, store, spec, x: torch.Tensor, y: torch.Tensor) -> None:
    """y[t, cols(m)] += B_m A_m x[t] in place, for the plan's tokens."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    torch.ops.loraxd_cpu.lora_bgmv(x, y, store.a, store.b, plan, spec.col_starts)
