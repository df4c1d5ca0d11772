"""Device slots for LoRA adapters: a fixed pool of `num_slots`, allocated once.

Layout per (layer, group), chosen for the op (see ops.py):
  a[slot]              [in * cap]      A's of the group's modules stacked and transposed,
                                       `[in, r_tot]` row-major at the start of the slot
  b[module][slot rows] [max_rank, out] `B^T [r, out]` in the first r rows of the slot
Each adapter keeps its own ranks (no padding is ever read), so memory is fixed by num_slots and
max_rank while the bytes a step reads are those of the adapters it uses.
"""

from __future__ import annotations

import torch

from loraxd.worker.device_copy import SideStreamUploads
from loraxd.worker.lora.ops import TorchLoraOp
from loraxd.worker.lora.peft_format import AdapterIncompatible, LoraAdapter
from loraxd.worker.lora.storage import (
    GroupStore, LoraOp, LoraStepContext, LoraStorage, SlotViews, group_specs,
)


class LoraSlotPool:
    """`num_slots` adapters on the device; `step_context(token_slots)` is what the model's
    linears call (`ctx.apply(layer_idx, group, x, y)`), through `op` (TorchLoraOp by default).
    load / unload happen between steps, never while a step context is in use; on CUDA a load's
    copies run on a side stream from pinned memory, and the next step waits for them on the
    device."""

    def __init__(
        self,
        num_slots: int,
        module_shapes: dict[str, tuple[int, int]],
        num_layers: int,
        max_rank: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        op: LoraOp | None = None,
    ) -> None:
        if num_slots <= 0 or max_rank <= 0 or num_layers <= 0:
            raise ValueError("num_slots, max_rank and num_layers must be positive")
        self.num_slots, self.num_layers, self.max_rank = num_slots, num_layers, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.op: LoraOp = op or TorchLoraOp()
        specs = group_specs(module_shapes)
        # Nothing reads past an adapter's own ranks, so on the CPU the rest is left untouched
        # (never-written pages cost no memory); elsewhere it is zeroed for future kernels.
        self._zero_tails = self.device.type != "cpu"
        alloc = torch.zeros if self._zero_tails else torch.empty
        stores = []
        for _ in range(num_layers):
            layer = {}
            for name, spec in specs.items():
                cap = len(spec.modules) * max_rank
                a = alloc(num_slots, spec.in_features * cap, dtype=dtype, device=self.device)
                b = tuple(alloc(num_slots * max_rank, out, dtype=dtype, device=self.device)
                          for out in spec.outs)
                layer[name] = GroupStore(a, b, [None] * num_slots)
            stores.append(layer)
        ranks = [{name: self._no_ranks(spec) for name, spec in specs.items()}
                 for _ in range(num_slots)]
        self.storage = LoraStorage(specs, stores, ranks, max_rank, self.device)
        self._adapters: list[LoraAdapter | None] = [None] * num_slots
        self._uploads = SideStreamUploads(self.device)

    @property
    def num_bytes(self) -> int:
        """Bytes the pool reserves (fixed at construction; on the CPU only the pages of loaded
        adapters' ranks are ever touched)."""
        return sum(t.numel() * t.element_size()
                   for layer in self.storage.stores for store in layer.values()
                   for t in (store.a, *store.b))

    def adapter(self, slot: int) -> LoraAdapter | None:
        return self._adapters[slot]

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot`, replacing what was there."""
        self._check_slot(slot)
        self._check_fits(adapter)
        self.unload(slot)
        with self._uploads:
            for name, spec in self.storage.specs.items():
                per_layer = []
                for layer_idx in range(self.num_layers):
                    store = self.storage.stores[layer_idx][name]
                    pairs = [adapter.weights.get((layer_idx, m)) for m in spec.modules]
                    store.views[slot] = self._write_group(store, spec, slot, pairs)
                    per_layer.append(tuple(0 if p is None else p[0].shape[0] for p in pairs))
                self.storage.set_ranks(slot, name, tuple(per_layer))
        self._adapters[slot] = adapter

    def unload(self, slot: int) -> None:
        self._check_slot(slot)
        for name, spec in self.storage.specs.items():
            self.storage.set_ranks(slot, name, self._no_ranks(spec))
            for layer in self.storage.stores:
                layer[name].views[slot] = None
        self._adapters[slot] = None

    def step_context(self, token_slots: torch.Tensor) -> LoraStepContext | None:
        """Per-step LoRA for `token_slots` [num_tokens] (-1: base model); None if all are -1.
        A host tensor: the ops read it on the host, which for a device tensor is a sync."""
        self._uploads.ready()
        return self.op.step(self.storage, token_slots)

    def static_context(self, token_slots: torch.Tensor) -> LoraStepContext:
        """A step context over every row of `token_slots` (an int32 device tensor, refilled
        by the caller; -1: no adapter) whose tensors never move: what a CUDA graph of the
        decode step captures. Only ops with `static_step` (the Triton one) can give it. Call
        `sync_static()` before each use."""
        if not hasattr(self.op, "static_step"):
            raise TypeError(f"{type(self.op).__name__} has no fixed-address step")
        return self.op.static_step(self.storage, token_slots)

    def sync_static(self) -> None:
        """Before a static context is used: wait for the uploads (on the device) and bring
        the op's per-slot tables up to date, in place."""
        self._uploads.ready()
        self.op.sync_static(self.storage)

    def _write_group(self, store: GroupStore, spec, slot: int, pairs) -> SlotViews | None:
        a_slot = store.a[slot]  # [in * cap]
        rows = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        if self._zero_tails:
            self._uploads.zero(a_slot)
            for b in store.b:
                self._uploads.zero(b[rows])
        present = [(j, a, b) for j, pair in enumerate(pairs) if pair is not None for a, b in [pair]]
        if not present:
            return None
        r_tot = sum(a.shape[0] for _, a, _ in present)
        at = a_slot[: spec.in_features * r_tot].view(spec.in_features, r_tot)
        self._uploads.copy(at, torch.cat([a for _, a, _ in present]).t())
        expands, h0 = [], 0
        for j, a, b in present:
            r = a.shape[0]
            bt = store.b[j][rows][:r]  # [r, out]
            self._uploads.copy(bt, b.t())
            c0 = spec.col_starts[j]
            cols = None if spec.outs[j] == spec.out_features else slice(c0, c0 + spec.outs[j])
            expands.append((cols, None if r == r_tot else slice(h0, h0 + r), bt))
            h0 += r
        return SlotViews(at, tuple(expands))

    def _no_ranks(self, spec) -> tuple[tuple[int, ...], ...]:
        return ((0,) * len(spec.modules),) * self.num_layers

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_fits(self, adapter: LoraAdapter) -> None:
        specs = self.storage.specs
        for (layer_idx, module), (a, b) in adapter.weights.items():
            if layer_idx >= self.num_layers:
                raise AdapterIncompatible(f"layer {layer_idx} >= num_layers {self.num_layers}")
            spec = next((s for s in specs.values() if module in s.modules), None)
            if spec is None:
                raise AdapterIncompatible(f"module {module!r} is not LoRA-capable here")
            out = spec.outs[spec.modules.index(module)]
            r = a.shape[0]
            if r > self.max_rank:
                raise AdapterIncompatible(
                    f"layer {layer_idx} {module}: rank {r} > pool max_rank {self.max_rank}")
            if tuple(a.shape) != (r, spec.in_features) or tuple(b.shape) != (out, r):
                raise AdapterIncompatible(
                    f"layer {layer_idx} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                    f"don't fit {spec.in_features} -> {out}")
