"""Batched heterogeneous LoRA: every token of a step may use its own adapter.

The model calls `ctx.apply(layer_idx, group, x, y)` right after each fused base matmul; `apply`
adds `B_{slot(t), m} (A_{slot(t), m} x[t])` into the columns of `y` that belong to module m, for
every token t and every module m of the group its adapter targets. Modules of a group share x,
so one shrink serves them all (A's of q, k and v stacked along the rank: `A_cat`).

`TorchLoraOp` (the `LoraOp` interface and the pool's types are storage.py's) sends each
adapter of a step down one of these paths, decided once per step in `step()` and shared by
every layer:

* the CPU kernel (decode: adapters with a few tokens each, pool on the CPU in fp32 or bf16,
  our kernels loaded; cpu_bgmv.py, cpu_kernels/lora_bgmv.cpp): one call per (layer, group)
  for all of these tokens, each token's `A_cat^T` and `B^T` rows read once where the pool
  keeps them, shrink and expand summed in registers, threads sharing the tokens (or, for
  a few tokens, their rows and columns). Any ranks, any target subsets, no padding read.
* embedding bags (the same tokens where the kernel is not loaded, the pool is elsewhere, or
  in another dtype): one op for the shrink and one per module for the expand, for all of
  these adapters at once, reading only their own rows. Shrink: a slot's `A_cat^T [in, r_tot]`
  is a table of `in` rows of width r_tot; token t's bag sums those rows weighted by
  `x[t, i]`, which is `A_cat x[t]`. Expand: the rows of the slot's `B^T [r, out]` weighted by
  that `h` sum to `B h`. Adapters of other r_tot get their own shrink op.
* GEMMs (an adapter with many tokens, e.g. a prefill; without the kernel also when only one
  or two adapters have few tokens): `x @ A_cat^T`, then one addmm per module on the
  adapter's slot views, straight into views of `y` when its tokens are contiguous.

Measured on SmolLM2-135M shapes, 2 cores (tests/unit/test_lora_bench.py): 8 decode tokens on 8
different rank-16 adapters take the bag path about half the time of the best alternative (all
slots stacked + mask, oneDNN-prepacked), which also grows with the pool size where this does
not; the kernel reads the same bytes with one call instead of about three and no index glue.
One adapter for all tokens and prefill runs are the GEMM path's.

On CUDA the Triton kernels (triton_op.py, SGMV/BGMV style) are another `LoraOp` with the
same `step(...) -> LoraStepContext`; this one is their reference and fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loraxd.worker.device_copy import to_device
from loraxd.worker.lora import cpu_bgmv
from loraxd.worker.lora.storage import (
    CachedStepOp, GroupSpec, GroupStore, LoraStorage, SlotViews,
)


@dataclass
class _Expand:
    j: int  # module index within the group
    h0: int  # its bag weights: h_mm[h0:h1]
    h1: int
    idx: torch.Tensor  # [sum of ranks] rows of b[j]
    offsets: torch.Tensor  # [num_tokens + 1]


@dataclass
class _Shrink:
    """One embedding-bag shrink over the tokens whose adapters share a stacked rank r_tot."""

    width: int  # D (normally r_tot): row width of the A table
    idx: torch.Tensor  # [num_bags * in]
    offsets: torch.Tensor  # [num_bags + 1]
    rows: slice | None  # its tokens' rows of x_sorted (None: all), one bag each ...
    bag_tokens: torch.Tensor | None = None  # ... or, when D < r_tot, the token of each bag


@dataclass
class _BagLayout:
    """Embedding-bag plan of one group for one rank layout of the step's adapters."""

    x_order: torch.Tensor | None  # x_sorted = x[x_order]: tokens by r_tot; None: x itself
    shrinks: list[_Shrink]
    h_perm: torch.Tensor | None  # shrink outputs, token by token -> module by module; None: same
    expands: list[_Expand]


@dataclass
class _Segment:
    """GEMM path: one adapter's tokens, a contiguous range or an index list."""

    slot: int
    start: int
    end: int
    idx: torch.Tensor | None = None
    whole: bool = False  # the step's every token


@dataclass
class TorchLoraStep:
    """A step's LoRA for TorchLoraOp: index structures built once, used by every layer."""

    storage: LoraStorage
    bags: dict[str, list[_BagLayout | None]] = field(default_factory=dict)  # group -> per layer
    plans: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)  # cpu_bgmv's
    segments: list[_Segment] = field(default_factory=list)

    def apply(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        store = self.storage.stores[layer_idx][group]
        if self.plans:
            plan = self.plans[group][layer_idx]
            if plan is not None:
                cpu_bgmv.apply(plan, store, self.storage.specs[group], x, y)
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
    xs = x if layout.x_order is None else x.index_select(0, layout.x_order)
    hs = []
    for sh in layout.shrinks:
        if sh.bag_tokens is not None:
            w = x.index_select(0, sh.bag_tokens)
        else:
            w = xs if sh.rows is None else xs[sh.rows]  # [num_bags, in]
        hs.append(_bag_sum(store.a.view(-1, sh.width), sh.idx, sh.offsets, w.reshape(-1)))
    h = hs[0].view(-1) if len(hs) == 1 else torch.cat([h.view(-1) for h in hs])
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
    if seg.idx is not None:
        h = x.index_select(0, seg.idx) @ views.at
        d = torch.zeros(h.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
        _expand(views, h, d)
        y.index_add_(0, seg.idx, d)
    elif seg.whole:
        _expand(views, x @ views.at, y)
    else:
        _expand(views, x[seg.start:seg.end] @ views.at, y[seg.start:seg.end])


def _expand(views: SlotViews, h, y) -> None:
    """y[:, cols] += h[:, h_cols] @ B^T for each of the slot's modules."""
    for cols, h_cols, bt in views.expands:
        (y if cols is None else y[:, cols]).addmm_(h if h_cols is None else h[:, h_cols], bt)


class TorchLoraOp(CachedStepOp):
    """LoraOp of torch ops, and of our CPU kernel where it is loaded.

    An adapter with at least `gemm_min_tokens` tokens in the step goes through the GEMM path.
    The others go to the CPU kernel (cpu_bgmv.py) when `cpu_kernel` allows it and the pool
    suits it (CPU, fp32 or bf16, library loaded; None: whenever it does), else they share
    the embedding-bag path when there are at least `min_bag_adapters` of them (its fixed
    cost is that of about three GEMM-path adapters), else the GEMM path too.
    `gemm_min_tokens` None: 32 where the kernel runs (a GEMM-path adapter's torch ops cost
    ~35 µs per layer and group, the kernel's ~2 µs per token), else 8.
    """

    def __init__(self, gemm_min_tokens: int | None = None, min_bag_adapters: int = 3,
                 cpu_kernel: bool | None = None) -> None:
        self.gemm_min_tokens = gemm_min_tokens
        self.min_bag_adapters = min_bag_adapters
        self.cpu_kernel = cpu_kernel

    def _build(self, storage: LoraStorage, slots: list[int]) -> TorchLoraStep | None:
        positions: dict[int, list[int]] = {}
        for t, slot in enumerate(slots):
            if slot >= 0:
                positions.setdefault(slot, []).append(t)
        if not positions:
            return None
        if max(positions) >= storage.num_slots:
            raise IndexError(f"token slot {max(positions)} >= num_slots {storage.num_slots}")
        ctx = TorchLoraStep(storage)
        kernel = self.cpu_kernel is not False and cpu_bgmv.usable(storage)
        least = self.gemm_min_tokens if self.gemm_min_tokens is not None else 32 if kernel else 8
        bag_slots = [s for s, pos in positions.items() if len(pos) < least]
        kernel = kernel and bool(bag_slots)
        if self.cpu_kernel and not kernel and bag_slots:
            raise RuntimeError("cpu_kernel=True, but the CPU LoRA kernel does not cover this pool")
        if len(bag_slots) < self.min_bag_adapters and not kernel:
            bag_slots = []
        for slot, pos in sorted(positions.items()):
            if slot in bag_slots:
                continue
            if pos[-1] - pos[0] + 1 == len(pos):
                whole = len(pos) == len(slots)
                ctx.segments.append(_Segment(slot, pos[0], pos[-1] + 1, whole=whole))
            else:
                idx = _on(pos, storage)
                ctx.segments.append(_Segment(slot, 0, 0, idx))
        if bag_slots:
            in_bags = set(bag_slots)
            bag_tokens = [(t, s) for t, s in enumerate(slots) if s in in_bags]
            if kernel:
                ctx.plans = _by_layer_ranks(storage, sorted(bag_slots),
                                            lambda spec, ranks: cpu_bgmv.plan(ranks, bag_tokens))
            else:
                ctx.bags = _by_layer_ranks(storage, sorted(bag_slots), lambda spec, ranks:
                                           _build_layout(storage, spec, ranks, bag_tokens,
                                                         len(slots)))
        return ctx


def _by_layer_ranks(storage: LoraStorage, slots, build) -> dict[str, list]:
    """group -> per layer `build(spec, {slot: its ranks there})`; layers where the slots
    have the same ranks share one result (a plan is built once per step, not per layer)."""
    out = {}
    for name, spec in storage.specs.items():
        per_slot = {s: storage.ranks[s][name] for s in slots}
        built: dict[tuple, object] = {}
        per_layer = []
        for layer_idx in range(storage.num_layers):
            ranks = {s: seq[layer_idx] for s, seq in per_slot.items()}
            key = tuple(ranks.values())
            if key not in built:
                built[key] = build(spec, ranks)
            per_layer.append(built[key])
        out[name] = per_layer
    return out


def _build_layout(storage, spec: GroupSpec, ranks, bag_tokens, num_tokens) -> _BagLayout | None:
    """Shrink: the slot's `A^T [in, r_tot]` is a table of rows of width D = r_tot; the bag of
    token t sums rows base + i (i < in) weighted by x[t, i], giving its `A_cat x` ([q | k | v]
    ranks). One embedding bag per distinct r_tot among the step's adapters, outputs one token
    after the other; `h_perm` reorders them module by module for the expands' bag weights."""
    r_tots = {slot: sum(rs) for slot, rs in ranks.items() if sum(rs)}
    if not r_tots:
        return None
    slot_len = storage.stores[0][spec.name].a.shape[1]  # in * cap
    shrinks, starts, h_len = [], {}, 0  # starts: token -> offset of its A_cat x in h
    x_order = []
    for r_tot in dict.fromkeys(r_tots.values()):
        width = math.gcd(slot_len, r_tot)
        bag_tok, bag_row, chunks = [], [], r_tot // width  # chunks: 1 unless D < r_tot
        for t, slot in bag_tokens:
            if r_tots.get(slot) == r_tot:
                # chunk c of token t: rows base + i * r_tot/D + c
                base = slot * slot_len // width
                bag_tok.extend([t] * chunks)
                bag_row.extend(range(base, base + chunks))
                starts[t], h_len = h_len, h_len + r_tot
                x_order.append(t)
        i = torch.arange(spec.in_features) * chunks
        idx = (torch.tensor(bag_row)[:, None] + i[None, :]).view(-1)
        offsets = torch.arange(0, idx.numel() + 1, spec.in_features)
        n = len(bag_tok) // chunks
        rows = None if n == num_tokens else slice(len(x_order) - n, len(x_order))
        shrinks.append(_Shrink(width, to_device(idx, storage.device),
                               to_device(offsets, storage.device), rows,
                               None if chunks == 1 else _on(bag_tok, storage)))
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
                                   to_device(offsets, storage.device)))
    return _BagLayout(None if x_order == list(range(num_tokens)) else _on(x_order, storage),
                      shrinks, None if perm == list(range(h_len)) else _on(perm, storage), expands)


def _on(values: list[int], storage: LoraStorage) -> torch.Tensor:
    """Index values on the pool's device (on CUDA without a host sync)."""
    return to_device(torch.tensor(values, dtype=torch.long), storage.device)
