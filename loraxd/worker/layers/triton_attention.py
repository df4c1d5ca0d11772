"""PagedAttention's prefill and decode on the Triton kernels of attention_kernels.py (CUDA, or
CPU tensors under TRITON_INTERPRET=1); the torch path in attention.py stays the reference.

The per-step index tensors (the prompts' row blocks) are built once on the host, copied
without a sync, and shared by every layer through the step context."""
from __future__ import annotations

import torch

from loraxd.worker.device_copy import tensor_on
from loraxd.worker.kv_cache import PagedKVCache


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


class TritonAttention:
    """`block_m` query rows per prefill program; `block_n` keys per loop iteration."""

    def __init__(self, block_m: int = 32, block_n: int = 32):
        from loraxd.worker.triton_support import interpreting

        self.block_m, self.block_n = block_m, block_n
        self.upcast = interpreting()  # see triton_common.mm

    def forward(self, attn, qkv: torch.Tensor, ctx, kv_cache: PagedKVCache) -> torch.Tensor:
        """`attn`: the PagedAttention layer (heads, scale, window, cap); its K/V are already
        in the cache. qkv [num_tokens, q|k|v] -> [num_tokens, heads * head_dim]."""
        out = qkv.new_empty(qkv.shape[0], attn.q_size)
        common = dict(HEAD_DIM=attn.head_dim, BLOCK_D=_pow2(attn.head_dim),
                      BLOCK_N=self.block_n, HAS_WINDOW=attn.sliding_window is not None,
                      HAS_SOFTCAP=attn.softcap is not None, UPCAST=self.upcast)
        window, cap = attn.sliding_window or 0, attn.softcap or 0.0
        if ctx.num_prefill_seqs:
            self._prefill(attn, qkv, ctx, out, window, cap, common)
        if ctx.num_decode:
            self._decode(attn, qkv, ctx, kv_cache, out, window, cap, common)
        return out

    def _prefill(self, attn, qkv, ctx, out, window, cap, common) -> None:
        from loraxd.worker.layers import attention_kernels as k

        starts, firsts, lens = self._prefill_blocks(ctx)
        k.prefill_attention[(starts.shape[0], attn.num_heads)](
            qkv, out, starts, firsts, lens, qkv.stride(0), out.stride(0), attn.scale, window,
            cap, HEADS=attn.num_heads, KV_HEADS=attn.num_kv_heads, BLOCK_M=self.block_m,
            **common)

    def _decode(self, attn, qkv, ctx, kv_cache, out, window, cap, common) -> None:
        from loraxd.worker.layers import attention_kernels as k

        p = ctx.num_prefill_tokens
        q, dec_out = qkv[p:], out[p:]
        table = ctx.decode_blocks.view(ctx.num_decode, -1)  # [num_decode, max_blocks]
        group = attn.num_heads // attn.num_kv_heads
        k.decode_attention[(ctx.num_decode, attn.num_kv_heads)](
            q, kv_cache.data[attn.layer_idx], table, ctx.decode_lens, dec_out, q.stride(0),
            dec_out.stride(0), table.stride(0), attn.scale, window, cap,
            KV_HEADS=attn.num_kv_heads, GROUP=group, PAGE=kv_cache.block_size,
            BLOCK_G=_pow2(group), **common)

    def _prefill_blocks(self, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per block of `block_m` query rows: its prompt's first row, its first row within
        the prompt, and the prompt's length (each [num_blocks] int32)."""
        key = ("triton_prefill_blocks", self.block_m)
        blocks = ctx.kernel_index.get(key)
        if blocks is None:
            rows = [(start, first, n)
                    for start, n in zip(ctx.prefill_starts, ctx.query_lens)
                    for first in range(0, n, self.block_m)]
            cols = tensor_on(rows, ctx.input_ids.device, torch.int32).t().contiguous()
            blocks = ctx.kernel_index[key] = (cols[0], cols[1], cols[2])
        return blocks
