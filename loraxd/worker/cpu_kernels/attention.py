"""Decode attention read straight from the paged KV cache (paged_attention.cpp), for fp32
and bf16 caches on CPU: no page gather, no mask, one pass per (sequence, KV head). The
arithmetic is fp32 either way; a bf16 model's q goes in as it is (the kernel widens it) and
its output comes back rounded to bf16, once, as SDPA's does."""
from __future__ import annotations

import torch

from loraxd.worker import cpu_kernels

CACHE_DTYPES = (torch.float32, torch.bfloat16)


def usable(cache: torch.Tensor) -> bool:
    """The kernel covers this layer's cache: fp32 or bf16 on CPU, and the library is loaded."""
    return (cache.dtype in CACHE_DTYPES and cache.is_cpu
            and cpu_kernels.enable() is None)


def _attend(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
            block_size: int, scale: float, window: int | None,
            softcap: float | None) -> torch.Tensor:
    return torch.ops.loraxd_cpu.paged_decode_attention(
        q, cache, table, lens, block_size, scale, window or 0, softcap or 0.0)


def paged_decode(q: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float,
                 window: int | None, softcap: float | None) -> torch.Tensor:
    """q [B, heads * d] (rows contiguous, any row stride: a view of the step's qkv);
    cache [slots, 2, kv_heads, d]; blocks [B * max_blocks] page ids; lens [B] context
    lengths including the new token -> [B, heads * d]."""
    table = blocks.view(q.shape[0], -1)
    return _attend(q, cache, table, lens, block_size, scale, window, softcap)


def paged_prefill(q: torch.Tensor, cache: torch.Tensor, pages: torch.Tensor, past: int,
                  block_size: int, scale: float, window: int | None,
                  softcap: float | None) -> torch.Tensor:
    """A prompt's slice after `past` cached tokens, its own K/V already in `pages`: row i
    (position past + i) attends like a decode token with past + i + 1 tokens, over the
    sequence's one page table (a stride-0 view, not n copies) -> [n, heads * d]."""
    n = q.shape[0]
    table = pages[None].expand(n, -1)
    lens = torch.arange(past + 1, past + n + 1, dtype=torch.long)
    return _attend(q, cache, table, lens, block_size, scale, window, softcap)
