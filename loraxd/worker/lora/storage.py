"""What every batched-LoRA op shares: the linears' groups of modules, the slot pool's tensors
as an op reads them (`LoraStorage`, owned by slots.LoraSlotPool), and the op interface.

A `LoraOp` builds a `LoraStepContext` once per step from the slot of every token; the model
calls `ctx.apply(layer_idx, group, x, y)` right after each fused base matmul. ops.TorchLoraOp
(torch, and our CPU kernel) and triton_op.TritonLoraOp (CUDA) are the two implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULES: tuple[str, ...] = tuple(m for ms in GROUP_MODULES.values() for m in ms)
MODULE_GROUP: dict[str, str] = {m: g for g, ms in GROUP_MODULES.items() for m in ms}


@dataclass(frozen=True)
class GroupSpec:
    """Shape of one fused linear: its input width and its modules' column ranges in `y`."""

    name: str
    in_features: int
    modules: tuple[str, ...]
    outs: tuple[int, ...]
    col_starts: tuple[int, ...]
    module_idx: tuple[int, ...]  # positions in MODULES

    @property
    def out_features(self) -> int:
        return sum(self.outs)


def group_specs(module_shapes: dict[str, tuple[int, int]]) -> dict[str, GroupSpec]:
    specs = {}
    for name, modules in GROUP_MODULES.items():
        missing = [m for m in modules if m not in module_shapes]
        if missing:
            raise ValueError(f"module_shapes lacks {missing}")
        ins = {module_shapes[m][0] for m in modules}
        if len(ins) != 1:
            raise ValueError(f"modules of group {name} have different in_features: {sorted(ins)}")
        outs = tuple(module_shapes[m][1] for m in modules)
        starts = tuple(sum(outs[:j]) for j in range(len(outs)))
        specs[name] = GroupSpec(name, ins.pop(), modules, outs, starts,
                                tuple(MODULES.index(m) for m in modules))
    return specs


@dataclass
class SlotViews:
    """One slot's weights in one (layer, group), as views for the GEMM path."""

    at: torch.Tensor  # [in, r_tot]: A's of the group's modules stacked, transposed
    # per targeted module (cols, h_cols, B^T [r, out]): y[:, cols] += h[:, h_cols] @ B^T,
    # a None slice meaning all columns
    expands: tuple[tuple[slice | None, slice | None, torch.Tensor], ...]


@dataclass
class GroupStore:
    """All slots' weights of one (layer, group).

    a: [num_slots, in * cap]; slot s holds `A_cat^T [in, r_tot]` (row-major) at its start.
    b: per module [num_slots * max_rank, out]; slot s's rows s*max_rank .. +r hold `B^T [r, out]`.
    """

    a: torch.Tensor
    b: tuple[torch.Tensor, ...]
    views: list[SlotViews | None]  # per slot; None: nothing targeted here


@dataclass
class LoraStorage:
    """What an op reads: the pool's tensors and each slot's ranks. Owned by LoraSlotPool."""

    specs: dict[str, GroupSpec]
    stores: list[dict[str, GroupStore]]  # [layer][group]
    # [slot][group] -> per layer, the rank of each of the group's modules (0: untargeted)
    ranks: list[dict[str, tuple[tuple[int, ...], ...]]]
    max_rank: int
    device: torch.device
    generation: int = 0  # bumped on every load/unload

    @property
    def num_slots(self) -> int:
        return len(self.ranks)

    @property
    def num_layers(self) -> int:
        return len(self.stores)

    def set_ranks(self, slot: int, group: str, per_layer: tuple[tuple[int, ...], ...]) -> None:
        self.ranks[slot][group] = per_layer
        self.generation += 1


class LoraStepContext(Protocol):
    def apply(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t, cols(m)] += B_{slot(t), m} A_{slot(t), m} x[t]  (in place)."""


class LoraOp(Protocol):
    def step(self, storage: LoraStorage, token_slots: torch.Tensor) -> LoraStepContext | None:
        """Per-step structures for `token_slots` [num_tokens]; None when no token has an adapter."""


class CachedStepOp:
    """A LoraOp's `step()`: the per-step plan is built once per (slot pool generation,
    token slots) and reused while neither changes (decode steps of one batch)."""

    _cache: tuple[tuple, object] | None = None

    def step(self, storage: LoraStorage, token_slots: torch.Tensor):
        """`token_slots` [num_tokens]: best a host tensor (a device one costs a sync)."""
        slots = token_slots.tolist()
        key = (storage.generation, id(storage), tuple(slots))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        ctx = self._build(storage, slots)
        self._cache = (key, ctx)
        return ctx

    def _build(self, storage: LoraStorage, slots: list[int]):
        raise NotImplementedError
