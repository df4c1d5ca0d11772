"""The paged KV cache and the page tables that index it.

One preallocated tensor holds every layer's pages: `[num_layers, num_blocks * block_size,
2, num_kv_heads, head_dim]`, a token's K and V side by side under one flat slot index
`block_id * block_size + offset`. The fused qkv output already lays out a token's K and V
that way (`qkv[:, q_size:]` viewed as `[num_tokens, 2, kv_heads, head_dim]`), so a layer
writes its step's K/V with one `index_copy_` and reads a decode batch's pages with one
`index_select` over whole pages.
"""
from __future__ import annotations

import torch

from loraxd.worker.device_copy import tensor_on


class PagedKVCache:
    """`num_blocks` pages for sequences, plus `null_block`: a page no sequence owns, so it
    stays zeros; page tables point their unused entries there."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: str | torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block = num_blocks
        # zeros, not empty: padded reads of unused slots must never see NaN garbage (a masked
        # position still multiplies its V by 0, and 0 * NaN is NaN)
        self.data = torch.zeros(num_layers, (num_blocks + 1) * block_size, 2, num_kv_heads,
                                head_dim, dtype=dtype, device=device)
        # each layer's [slots, 2, kv_heads, head_dim] view, made once: indexing `data` per
        # layer and step is a dispatched op each time
        self.layers = self.data.unbind(0)
        # reused by every layer's gather: a fresh 1-2 MB tensor per layer would cost page
        # faults (glibc maps large blocks anew) that take longer than the copy itself
        self._gather_buf = torch.zeros(0, block_size, 2, num_kv_heads, head_dim, dtype=dtype,
                                       device=device)

    @staticmethod
    def page_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
        """Bytes of one page over every layer."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return num_layers * block_size * 2 * num_kv_heads * head_dim * itemsize

    def write(self, layer_idx: int, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """kv [num_tokens, 2, kv_heads, head_dim] into the slots of slot_mapping [num_tokens]."""
        self.layers[layer_idx].index_copy_(0, slot_mapping, kv)

    def gather_blocks(self, layer_idx: int, block_ids: torch.Tensor) -> torch.Tensor:
        """[len(block_ids) * block_size, 2, kv_heads, head_dim]: the K/V of whole pages, in
        order. Copies one contiguous page per index (faster than a row per token). The
        result is a shared buffer, valid until the next gather."""
        n = block_ids.shape[0]
        if n > self._gather_buf.shape[0]:
            shape = (max(n, 2 * self._gather_buf.shape[0]),) + self._gather_buf.shape[1:]
            self._gather_buf = self._gather_buf.new_zeros(shape)
        pages = self.layers[layer_idx].view(self.num_blocks + 1, -1)  # [pages, page numel]
        out = self._gather_buf[:n].view(n, -1)
        torch.index_select(pages, 0, block_ids, out=out)
        return self._gather_buf[:n].view(n * self.block_size, *self.data.shape[2:])

    def clear_blocks(self, block_ids: list[int]) -> None:
        """Zero these pages in every layer: what a failed sequence left there (NaN, inf)
        must not reach the masked reads of the next sequence that gets them."""
        if block_ids:
            ids = tensor_on(block_ids, self.data.device)
            self.data.view(self.data.shape[0], self.num_blocks + 1, -1)[:, ids] = 0


class BlockTables:
    """Every running sequence's page table, one row of a tensor each, so a step indexes the
    rows of its sequences at once instead of rebuilding tables from Python lists."""

    def __init__(self, device: str | torch.device, rows: int = 64, cols: int = 64,
                 pad: int = 0):
        """`pad`: the page unused entries name (a decode step reads a short sequence's
        table up to the longest one's length, masked): the cache's null block."""
        self.device = device
        self.pad = pad
        self.table = torch.full((rows, cols), pad, dtype=torch.long, device=device)
        self.lengths: list[int] = [0] * rows  # blocks in each row
        self.free_rows = list(range(rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        """A new sequence's table; returns its row."""
        if not self.free_rows:
            self._grow_rows()
        row = self.free_rows.pop()
        self.lengths[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        start, end = self.lengths[row], self.lengths[row] + len(block_ids)
        if end > self.table.shape[1]:
            self._grow_cols(end)
        if block_ids:
            self.table[row, start:end] = tensor_on(block_ids, self.device, torch.long)
        self.lengths[row] = end

    def blocks(self, row: int) -> list[int]:
        return self.table[row, :self.lengths[row]].tolist()

    def free(self, row: int) -> None:
        self.table[row, :self.lengths[row]] = self.pad  # no stale page left for the next
        self.lengths[row] = 0
        self.free_rows.append(row)

    def _grow_rows(self) -> None:
        rows, cols = self.table.shape
        extra = torch.full((rows, cols), self.pad, dtype=torch.long, device=self.device)
        self.table = torch.cat((self.table, extra))
        self.lengths.extend([0] * rows)
        self.free_rows.extend(range(2 * rows - 1, rows - 1, -1))

    def _grow_cols(self, needed: int) -> None:
        rows, cols = self.table.shape
        new_cols = max(needed, 2 * cols)
        extra = torch.full((rows, new_cols - cols), self.pad, dtype=torch.long,
                           device=self.device)
        self.table = torch.cat((self.table, extra), 1)
