"""`TritonLoraOp`: the batched-LoRA interface (`LoraOp`) on the Triton kernels of
triton_kernels.py, for the pool layout slots.py writes (the same one TorchLoraOp reads).

A step's tokens are split once, on the host, from the token slots the runner passes (a host
tensor: reading it is no device sync): runs of at least `block_min_tokens` consecutive tokens
of one adapter (a prefill prompt) are cut into blocks of `block_m` rows for the tile kernels;
every other adapter token (decode) is listed for the per-token kernels. Each slot's ranks per
layer live in small device tables, rebuilt when the pool's generation changes. A group's
modules share one shrink (`A_cat x`, q|k|v or gate|up ranks side by side), as on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraxd.worker.device_copy import to_device
from loraxd.worker.lora.storage import CachedStepOp, LoraStorage

MAX_GROUP_MODULES = 3
BLOCK_K = 64  # input features per shrink iteration
BLOCK_R = 64  # shrink output columns per program
BLOCK_R_EXPAND = 16  # ranks per expand iteration (tl.dot needs 16)
BLOCK_N = 128  # output columns per expand program


@dataclass
class RankTables:
    """One group's ranks on the device: per layer and slot, r_tot and per module its rank and
    its first column in h."""

    rtot: torch.Tensor  # [num_layers, num_slots] int32
    rank: torch.Tensor  # [num_layers, num_slots, num_modules] int32
    hoff: torch.Tensor  # [num_layers, num_slots, num_modules] int32


def rank_tables(storage: LoraStorage) -> dict[str, RankTables]:
    tables = {}
    for name, spec in storage.specs.items():
        # [num_slots, num_layers, num_modules] from the pool's per-slot tuples
        ranks = torch.tensor([list(storage.ranks[s][name]) for s in range(storage.num_slots)],
                             dtype=torch.int32).reshape(storage.num_slots, storage.num_layers,
                                                        len(spec.modules))
        ranks = ranks.transpose(0, 1).contiguous()  # [num_layers, num_slots, num_modules]
        hoff = ranks.cumsum(-1, dtype=torch.int32) - ranks
        tables[name] = RankTables(to_device(ranks.sum(-1, dtype=torch.int32), storage.device),
                                  to_device(ranks, storage.device),
                                  to_device(hoff, storage.device))
    return tables


@dataclass
class _Work:
    """What one kind of kernel covers: listed tokens, or blocks of consecutive rows."""

    count: int
    rows: torch.Tensor  # [count] int32: the token, or a block's first row
    slots: torch.Tensor  # [count] int32
    nrows: torch.Tensor | None = None  # [count] int32, blocks only


def split_work(slots: list[int], block_min_tokens: int, block_m: int
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(token, slot) for the per-token kernels and (first row, rows, slot) for the block
    kernels, from each token's slot (-1: none). Runs are maximal stretches of one slot."""
    tokens, blocks, t = [], [], 0
    while t < len(slots):
        slot, end = slots[t], t + 1
        while end < len(slots) and slots[end] == slot:
            end += 1
        if slot >= 0:
            if end - t >= block_min_tokens:
                blocks.extend((row, min(block_m, end - row), slot)
                              for row in range(t, end, block_m))
            else:
                tokens.extend((row, slot) for row in range(t, end))
        t = end
    return tokens, blocks


@dataclass
class TritonLoraStep:
    storage: LoraStorage
    tables: dict[str, RankTables]
    tokens: _Work | None
    blocks: _Work | None
    block_m: int
    upcast: bool  # the interpreter cannot multiply bfloat16: dot operands in fp32

    def apply(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        from loraxd.worker.lora import triton_kernels as k

        store = self.storage.stores[layer_idx][group]
        spec = self.storage.specs[group]
        tab = self.tables[group]
        x = x if x.stride(1) == 1 else x.contiguous()
        cap = store.a.shape[1] // spec.in_features
        h = torch.empty(x.shape[0], cap, dtype=torch.float32, device=x.device)  # [T, cap]
        num_modules = len(spec.modules)
        bs = list(store.b) + [store.b[0]] * (MAX_GROUP_MODULES - num_modules)
        outs = list(spec.outs) + [0] * (MAX_GROUP_MODULES - num_modules)
        rtot, rank, hoff = tab.rtot[layer_idx], tab.rank[layer_idx], tab.hoff[layer_idx]
        r_blocks = -(-cap // BLOCK_R)
        n_blocks = -(-max(spec.outs) // BLOCK_N)
        common = (x.stride(0), store.a.stride(0), h.stride(0), spec.in_features)
        expand_args = (*bs, *outs, h.stride(0), y.stride(0), self.storage.max_rank)
        if self.tokens is not None:
            w = self.tokens
            k.shrink_tokens[(w.count, r_blocks)](
                x, store.a, h, w.rows, w.slots, rtot, *common, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
            k.expand_tokens[(w.count, num_modules, n_blocks)](
                h, y, w.rows, w.slots, rank, hoff, *expand_args, NUM_MODULES=num_modules,
                BLOCK_R=BLOCK_R_EXPAND, BLOCK_N=BLOCK_N)
        if self.blocks is not None:
            w = self.blocks
            k.shrink_blocks[(w.count, r_blocks)](
                x, store.a, h, w.rows, w.nrows, w.slots, rtot, *common, BLOCK_M=self.block_m,
                BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, UPCAST=self.upcast)
            k.expand_blocks[(w.count, num_modules, n_blocks)](
                h, y, w.rows, w.nrows, w.slots, rank, hoff, *expand_args,
                NUM_MODULES=num_modules, BLOCK_M=self.block_m, BLOCK_R=BLOCK_R_EXPAND,
                BLOCK_N=BLOCK_N, UPCAST=self.upcast)


class TritonLoraOp(CachedStepOp):
    """LoraOp on Triton: CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""

    def __init__(self, block_min_tokens: int = 8, block_m: int = 16) -> None:
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m {block_m}: a power of two >= 16 (tl.dot)")
        from loraxd.worker.triton_support import interpreting

        self.block_min_tokens, self.block_m = block_min_tokens, block_m
        self.upcast = interpreting()  # see triton_common.mm
        self._tables: tuple[tuple[int, int], dict[str, RankTables]] | None = None

    def _build(self, storage: LoraStorage, slots: list[int]) -> TritonLoraStep | None:
        used = [s for s in slots if s >= 0]
        if not used:
            return None
        if max(used) >= storage.num_slots:
            raise IndexError(f"token slot {max(used)} >= num_slots {storage.num_slots}")
        tokens, blocks = split_work(slots, self.block_min_tokens, self.block_m)
        return TritonLoraStep(storage, self._rank_tables(storage), _work(tokens, storage),
                              _work(blocks, storage), self.block_m, self.upcast)

    def static_step(self, storage: LoraStorage, token_slots: torch.Tensor) -> TritonLoraStep:
        """A step over every row of `token_slots` (an int32 device tensor the caller refills
        before each replay; -1: no adapter, which the kernels skip) whose tensors stay put,
        as a CUDA graph captured over it needs. `sync_static` keeps its rank tables current."""
        rows = torch.arange(token_slots.shape[0], dtype=torch.int32, device=token_slots.device)
        return TritonLoraStep(storage, self._rank_tables(storage),
                              _Work(token_slots.shape[0], rows, token_slots), None,
                              self.block_m, self.upcast)

    def sync_static(self, storage: LoraStorage) -> None:
        """Bring the rank tables up to date with the pool (in place)."""
        self._rank_tables(storage)

    def _rank_tables(self, storage: LoraStorage) -> dict[str, RankTables]:
        key = (id(storage), storage.generation)
        if self._tables is None or self._tables[0][0] != key[0]:
            self._tables = (key, rank_tables(storage))
        elif self._tables[0] != key:  # refilled, never replaced: captured graphs read them
            fresh = rank_tables(storage)
            for name, tables in self._tables[1].items():
                for old, new in zip((tables.rtot, tables.rank, tables.hoff),
                                    (fresh[name].rtot, fresh[name].rank, fresh[name].hoff)):
                    old.copy_(new)
            self._tables = (key, self._tables[1])
        return self._tables[1]


def _work(items: list[tuple], storage: LoraStorage) -> _Work | None:
    if not items:
        return None
    cols = to_device(torch.tensor(items, dtype=torch.int32).t().contiguous(), storage.device)
    if cols.shape[0] == 2:
        return _Work(len(items), cols[0], cols[1])
    return _Work(len(items), cols[0], cols[2], cols[1])
