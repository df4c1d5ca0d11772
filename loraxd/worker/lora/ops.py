"""Batched heterogeneous LoRA: every token of a step may use its own adapter.

The model calls `ctx.apply(layer_idx, group, x, y)` right after each fused base matmul; `apply`
adds `B_{slot(t), m} (A_{slot(t), m} x[t])` into the columns of `y` that belong to module m, for
every token t and every module m of the group its adapter targets. Modules of a group share x,
so one shrink serves them all (A's of q, k and v stacked along the rank).

`TorchLoraOp` (pure torch) sorts the step's adapters into two paths, decided once per step:

* few tokens per adapter (decode): an embedding-bag formulation that reads only the adapters
  present in the step, for all of them in one op per shrink and one per module for the expand,
  whatever the number of distinct adapters and their ranks. Shrink: the slot's `A^T [in, r]`
  is a table of rows of width D (D divides every rank present); bag (token, chunk) sums the
  rows `i * r/D + chunk` weighted by `x[t, i]`, giving D entries of `h = A x`. Expand: the
  slot's `B^T [r, out]` rows weighted by `h` give `B h`.
* many tokens for one adapter (prefill, or a batch on one adapter): two GEMMs per module on
  that adapter's slot views, straight into views of `y` when its tokens are contiguous.

All index structures are built once per step (`TorchLoraOp.step`) and shared by every layer.
A GPU kernel (SGMV/BGMV) is another `LoraOp` with the same `step(...) -> LoraStepContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

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
    # per targeted module: (col0, col1, h0, h1, B^T [r, out]): y[:, col0:col1] += h[:, h0:h1] @ B^T
    expands: tuple[tuple[int, int, int, int, torch.Tensor], ...]


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


@dataclass
class _Expand:
    j: int  # module index within the group
    h0: int  # its bag weights: h_mm[h0:h1]
    h1: int
    idx: torch.Tensor  # [sum of ranks] rows of b[j]
    offsets: torch.Tensor  # [num_tokens + 1]


@dataclass
class _BagLayout:
    """Embedding-bag plan of one group for one rank layout of the step's adapters."""

    width: int  # D: row width of the A table
    shrink_idx: torch.Tensor  # [num_bags * in]
    shrink_offsets: torch.Tensor  # [num_bags + 1]
    bag_tokens: torch.Tensor | None  # [num_bags] token of each bag; None: bag t is token t
    h_perm: torch.Tensor | None  # token-major h -> module-major h_mm; None: the same
    expands: list[_Expand]


@dataclass
class _Segment:
    """GEMM path: one adapter's tokens, a contiguous range or an index list."""

    slot: int
    start: int
    end: int
    idx: torch.Tensor | None = None


@dataclass
class TorchLoraStep:
    storage: LoraStorage
    num_tokens: int
    bags: dict[str, list[_BagLayout | None]] = field(default_factory=dict)  # group -> per layer
    segments: list[_Segment] = field(default_factory=list)

    def apply(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        store = self.storage.stores[layer_idx][group]
        layout = self.bags[group][layer_idx] if self.bags else None
        if layout is not None:
            _apply_bags(layout, store, self.storage.specs[group], x, y)
        for seg in self.segments:
            views = store.views[seg.slot]
            if views is not None:
                _apply_gemm(seg, views, x, y)


def _bag_sum(table, idx, offsets, weights) -> torch.Tensor:
    """out[b] = sum_k weights[k] * table[idx[k]] over offsets[b] <= k < offsets[b+1]."""
    return torch.embedding_bag(table, idx, offsets, False, 0, False, weights, True)[0]


def _apply_bags(layout: _BagLayout, store: GroupStore, spec: GroupSpec, x, y) -> None:
    w = x if layout.bag_tokens is None else x.index_select(0, layout.bag_tokens)
    table = store.a.view(-1, layout.width)
    h = _bag_sum(table, layout.shrink_idx, layout.shrink_offsets, w.reshape(-1)).view(-1)
    if layout.h_perm is not None:
        h = h.index_select(0, layout.h_perm)
    ds = [_bag_sum(store.b[e.j], e.idx, e.offsets, h[e.h0:e.h1]) for e in layout.expands]
    if len(ds) == len(spec.modules):  # every column of y: one add
        y.add_(ds[0] if len(ds) == 1 else torch.cat(ds, 1))
        return
    for e, d in zip(layout.expands, ds):
        c0 = spec.col_starts[e.j]
        y[:, c0:c0 + spec.outs[e.j]].add_(d)


def _apply_gemm(seg: _Segment, views: SlotViews, x, y) -> None:
    if seg.idx is None:
        h = x[seg.start:seg.end] @ views.at  # [n, r_tot]
        ys = y[seg.start:seg.end]
        for c0, c1, h0, h1, bt in views.expands:
            ys[:, c0:c1].addmm_(h[:, h0:h1], bt)
        return
    h = x.index_select(0, seg.idx) @ views.at
    d = torch.zeros(h.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for c0, c1, h0, h1, bt in views.expands:
        d[:, c0:c1].addmm_(h[:, h0:h1], bt)
    y.index_add_(0, seg.idx, d)


class TorchLoraOp:
    """Pure-torch LoraOp.

    An adapter with at least `gemm_min_tokens` tokens in the step goes through the GEMM path;
    the others share the embedding-bag path when there are at least `min_bag_adapters` of
    them (its fixed cost is that of about three GEMM-path adapters), else the GEMM path too.
    """

    def __init__(self, gemm_min_tokens: int = 8, min_bag_adapters: int = 3) -> None:
        self.gemm_min_tokens = gemm_min_tokens
        self.min_bag_adapters = min_bag_adapters
        self._cache: tuple[tuple, TorchLoraStep | None] | None = None

    def step(self, storage: LoraStorage, token_slots: torch.Tensor) -> TorchLoraStep | None:
        slots = token_slots.tolist()
        key = (storage.generation, id(storage), tuple(slots))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        ctx = self._build(storage, slots)
        self._cache = (key, ctx)
        return ctx

    def _build(self, storage: LoraStorage, slots: list[int]) -> TorchLoraStep | None:
        positions: dict[int, list[int]] = {}
        for t, slot in enumerate(slots):
            if slot >= 0:
                positions.setdefault(slot, []).append(t)
        if not positions:
            return None
        if max(positions) >= storage.num_slots:
            raise IndexError(f"token slot {max(positions)} >= num_slots {storage.num_slots}")
        ctx = TorchLoraStep(storage, len(slots))
        bag_slots = [s for s, pos in positions.items() if len(pos) < self.gemm_min_tokens]
        if len(bag_slots) < self.min_bag_adapters:
            bag_slots = []
        for slot, pos in sorted(positions.items()):
            if slot in bag_slots:
                continue
            if pos[-1] - pos[0] + 1 == len(pos):
                ctx.segments.append(_Segment(slot, pos[0], pos[-1] + 1))
            else:
                idx = torch.tensor(pos, dtype=torch.long, device=storage.device)
                ctx.segments.append(_Segment(slot, 0, 0, idx))
        if bag_slots:
            in_bags = set(bag_slots)
            bag_tokens = [(t, s) for t, s in enumerate(slots) if s in in_bags]
            ctx.bags = _build_bags(storage, sorted(bag_slots), bag_tokens, len(slots))
        return ctx


def _build_bags(storage: LoraStorage, bag_slots, bag_tokens, num_tokens):
    """group -> per layer layout; layers with the same ranks share one layout."""
    bags = {}
    for name, spec in storage.specs.items():
        per_slot = {s: storage.ranks[s][name] for s in bag_slots}
        if all(len(set(seq)) == 1 for seq in per_slot.values()):  # same ranks in every layer
            ranks = {s: seq[0] for s, seq in per_slot.items()}
            layout = _build_layout(storage, spec, ranks, bag_tokens, num_tokens)
            bags[name] = [layout] * storage.num_layers
            continue
        layouts: dict[tuple, _BagLayout | None] = {}
        per_layer = []
        for layer_idx in range(storage.num_layers):
            ranks = {s: seq[layer_idx] for s, seq in per_slot.items()}
            key = tuple(ranks.values())
            if key not in layouts:
                layouts[key] = _build_layout(storage, spec, ranks, bag_tokens, num_tokens)
            per_layer.append(layouts[key])
        bags[name] = per_layer
    return bags


def _build_layout(storage, spec: GroupSpec, ranks, bag_tokens, num_tokens) -> _BagLayout | None:
    """Token-major bags: token t's chunks c = 0 .. r_tot/D - 1 read rows base + i * r_tot/D + c
    (i < in) of its slot's `A^T [in, r_tot]` seen as a table of rows of width D, so `h` holds
    each token's `A_cat x` ([q | k | v] ranks) one token after the other; `h_perm` reorders it
    module by module for the expands' bag weights."""
    r_tots = {slot: sum(rs) for slot, rs in ranks.items() if sum(rs)}
    if not r_tots:
        return None
    slot_len = storage.stores[0][spec.name].a.shape[1]  # in * cap
    width = math.gcd(slot_len, *r_tots.values())
    bag_tok, bag_row, bag_stride, starts, h_len = [], [], [], {}, 0
    for t, slot in bag_tokens:
        r_tot = r_tots.get(slot, 0)
        for c in range(r_tot // width):
            bag_tok.append(t)
            bag_row.append(slot * slot_len // width + c)
            bag_stride.append(r_tot // width)
        if r_tot:
            starts[t], h_len = h_len, h_len + r_tot
    perm, expands = [], []
    for j in range(len(spec.modules)):
        counts, rows, h0 = [0] * num_tokens, [], len(perm)
        for t, slot in bag_tokens:
            rs = ranks[slot]
            if rs[j]:
                counts[t] = rs[j]
                rows.extend(range(slot * storage.max_rank, slot * storage.max_rank + rs[j]))
                perm.extend(range(starts[t] + sum(rs[:j]), starts[t] + sum(rs[:j]) + rs[j]))
        if rows:
            offsets = torch.tensor([0] + counts).cumsum(0)
            expands.append(_Expand(j, h0, len(perm), _on(rows, storage),
                                   offsets.to(storage.device)))
    i = torch.arange(spec.in_features)
    shrink_idx = torch.tensor(bag_row)[:, None] + i[None, :] * torch.tensor(bag_stride)[:, None]
    shrink_offsets = torch.arange(0, shrink_idx.numel() + 1, spec.in_features)
    return _BagLayout(
        width, shrink_idx.view(-1).to(storage.device), shrink_offsets.to(storage.device),
        None if bag_tok == list(range(num_tokens)) else _on(bag_tok, storage),
        None if perm == list(range(h_len)) else _on(perm, storage), expands)


def _on(values: list[int], storage: LoraStorage) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(storage.device)
