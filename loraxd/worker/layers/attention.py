"""Attention over the paged KV cache, and the per-step context every layer reads.

A step's tokens are flat: first each prefill sequence's prompt (rows
`[prefill_starts[i], prefill_starts[i] + query_lens[i])`), then one row per decode sequence.
Each layer writes the step's K/V to the cache (one index op), runs causal SDPA per prefill
sequence, and one batched SDPA for all decode sequences over their pages gathered into
`[B, max_len]` (an fp32 cache on CPU: our kernel reads the pages in place instead). A
prefill that starts at the beginning of its context attends to its own rows; one that
follows cached tokens (a prefix-cache hit, a prompt's later slice) attends to its pages,
the step's K/V included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from loraxd.worker.cpu_kernels import attention as cpu_attention
from loraxd.worker.cpu_kernels import small_ops
from loraxd.worker.kv_cache import PagedKVCache
from loraxd.worker.layers.rotary import apply_rotary

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


class LoraStep(Protocol):
    """What the LoRA code hands `ModelRunner.execute` (see layers/linear.py for the call site).

    `apply(layer_idx, group, x, y)` adds the LoRA delta of group "qkv", "o", "gate_up" or
    "down" into y [num_tokens, out] in place, for input x [num_tokens, in]. If the object
    also has `prepare(ctx)`, the runner calls it once per step before the forward pass, with
    the StepContext (token_slots, req_ids, seq_slots, query_lens …).
    """

    def apply(self, layer_idx: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None: ...


@dataclass(eq=False)
class StepContext:
    # per token, [num_tokens]
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor  # flat cache slot of each token's K/V: block_id*block_size+offset
    token_slots: torch.Tensor  # adapter slot of each token's sequence, -1: base model
    # per sequence, in output order (prefill sequences, then decode sequences)
    req_ids: list[int]
    seq_slots: list[int]  # adapter slot, -1: base model
    query_lens: list[int]  # rows of this step's batch
    seq_lens: list[int]  # tokens in the cache after this step
    num_prefill_seqs: int
    num_prefill_tokens: int
    prefill_starts: list[int]  # first row of each prefill sequence
    # decode sequences (rows num_prefill_tokens..)
    decode_blocks: torch.Tensor | None  # [num_decode * max_blocks] each one's pages, padded
    decode_lens: torch.Tensor | None  # [num_decode] context lengths incl. this step's token
    decode_max_len: int  # max_blocks * block_size
    # which final hidden rows get logits, and each sequence's sampling row among them
    logits_idx: torch.Tensor  # [num_logit_rows]
    sample_idx: torch.Tensor | None  # [num_seqs]; None: every logit row, in order
    dtype: torch.dtype
    lora: Any = None  # a LoraStep, or None when no sequence of the step uses an adapter
    # tokens of each prefill sequence cached before this step, and the pages of those with
    # some (else None)
    prefill_past: list[int] = field(default_factory=list)
    prefill_pages: list[torch.Tensor | None] = field(default_factory=list)
    # layer type -> (cos, sin), each [num_tokens, 1, head_dim]; set by the model
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)
    kernel_index: dict = field(default_factory=dict)  # index tensors kernels derive, per step

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_decode(self) -> int:
        return len(self.req_ids) - self.num_prefill_seqs

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """Additive mask [num_decode, 1, 1, max_len]: 0 where a decode token attends, else -inf."""
        key = ("decode", window)
        mask = self._masks.get(key)
        if mask is None:
            cols = torch.arange(self.decode_max_len, device=self.decode_lens.device)
            lens = self.decode_lens[:, None]
            keep = cols[None, :] < lens
            if window is not None:
                keep &= cols[None, :] >= lens - window  # the new token is at lens - 1
            mask = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device)
            mask.masked_fill_(~keep, float("-inf"))
            mask = mask[:, None, None, :]
            self._masks[key] = mask
        return mask

    @property
    def has_past(self) -> bool:
        """Some prefill sequence follows cached tokens."""
        return any(self.prefill_past)

    def past_mask(self, seq: int, cols: int, window: int | None) -> torch.Tensor:
        """A bool mask [n, cols] for prefill sequence `seq` over its gathered pages: row i
        (position past + i) sees the positions up to its own."""
        key = ("past", seq, cols, window)
        mask = self._masks.get(key)
        if mask is None:
            dev = self.input_ids.device
            pos = torch.arange(self.query_lens[seq], device=dev)[:, None] + self.prefill_past[seq]
            col = torch.arange(cols, device=dev)[None, :]
            mask = col <= pos
            if window is not None:
                mask &= col > pos - window
            self._masks[key] = mask
        return mask

    def prefill_mask(self, seq: int, window: int | None) -> torch.Tensor | None:
        """A bool mask [n, n] for prefill sequence `seq` when a sliding window cuts its
        prompt; None when plain causal attention is exact."""
        n = self.query_lens[seq]
        if window is None or n <= window:
            return None
        key = ("prefill", n, window)
        mask = self._masks.get(key)
        if mask is None:
            rows = torch.arange(n, device=self.input_ids.device)
            distance = rows[:, None] - rows[None, :]
            mask = (distance >= 0) & (distance < window)
            self._masks[key] = mask
        return mask


class PagedAttention:
    """`rope_key` picks the step's rotary tables (per layer type); `qk_norms` (a q and a k
    RMSNorm over head_dim, applied before the rotation) for Qwen3 and Gemma 3; `softcap`
    caps the scores at `cap * tanh(score / cap)` before the mask (Gemma 2). `kernels`: an
    object whose `forward(layer, qkv, ctx, kv_cache)` attends in place of the torch code below
    once the step's K/V are in the cache (TritonAttention on CUDA)."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 *, scale: float, sliding_window: int | None = None,
                 rope_key: str = "full_attention", qk_norms: tuple | None = None,
                 softcap: float | None = None, kernels=None):
        self.layer_idx = layer_idx
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.rope_key = rope_key
        self.qk_norms = qk_norms
        self.softcap = softcap

    def forward(self, qkv: torch.Tensor, ctx: StepContext, kv_cache: PagedKVCache
                ) -> torch.Tensor:
        """qkv [num_tokens, q|k|v] (rotated here, in place) -> [num_tokens, num_heads*head_dim]."""
        num_tokens = qkv.shape[0]
        if self.qk_norms is not None:
            q_norm, k_norm = self.qk_norms
            q_norm.norm_(qkv[:, :self.q_size].view(num_tokens, self.num_heads, self.head_dim))
            k_norm.norm_(qkv[:, self.q_size:self.q_size + self.kv_size]
                         .view(num_tokens, self.num_kv_heads, self.head_dim))
        self._rotate_and_cache(qkv, ctx, kv_cache)
        if self.kernels is not None and not ctx.has_past:  # its prefill reads no pages
            return self.kernels.forward(self, qkv, ctx, kv_cache)
        if ctx.num_prefill_seqs == 0:
            return self._decode(qkv, ctx, kv_cache)
        if ctx.num_decode == 0 and ctx.num_prefill_seqs == 1:
            return self._prefill(qkv, ctx, 0, kv_cache)
        out = qkv.new_empty(num_tokens, self.q_size)
        for seq, start in enumerate(ctx.prefill_starts):
            out[start:start + ctx.query_lens[seq]] = self._prefill(qkv, ctx, seq, kv_cache)
        if ctx.num_decode:
            out[ctx.num_prefill_tokens:] = self._decode(qkv, ctx, kv_cache)
        return out

    def _rotate_and_cache(self, qkv: torch.Tensor, ctx: StepContext,
                          kv_cache: PagedKVCache) -> None:
        """Rotate q and k in place, then write the step's K/V to the cache: one call on a
        CPU (small_ops), where the cache's dtype is qkv's."""
        num_tokens = qkv.shape[0]
        cos, sin = ctx.rope[self.rope_key]
        if small_ops.covers(qkv) and cos.dtype == qkv.dtype:
            cache = kv_cache.layers[self.layer_idx]
            same = cache.dtype == qkv.dtype and cache.device == qkv.device
            small_ops.rotary_(qkv, self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                              cache if same else None, ctx.slot_mapping if same else None)
            if same:
                return
        else:
            qk = qkv[:, :self.q_size + self.kv_size]
            apply_rotary(qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim),
                         cos, sin)
        kv = qkv[:, self.q_size:].view(num_tokens, 2, self.num_kv_heads, self.head_dim)
        kv_cache.write(self.layer_idx, kv, ctx.slot_mapping)

    def _prefill(self, qkv: torch.Tensor, ctx: StepContext, seq: int,
                 kv_cache: PagedKVCache) -> torch.Tensor:
        start = ctx.prefill_starts[seq]
        n = ctx.query_lens[seq]
        rows = qkv[start:start + n]
        d = self.head_dim
        q = rows[:, :self.q_size].view(n, self.num_heads, d).transpose(0, 1)
        if ctx.has_past and ctx.prefill_past[seq]:
            cache = kv_cache.layers[self.layer_idx]
            if cpu_attention.usable(cache):  # the pages where they lie, as for decode
                return cpu_attention.paged_prefill(
                    rows[:, :self.q_size], cache, ctx.prefill_pages[seq],
                    ctx.prefill_past[seq], kv_cache.block_size, self.scale,
                    self.sliding_window, self.softcap)
            pages = kv_cache.gather_blocks(self.layer_idx, ctx.prefill_pages[seq])
            k, v = pages[:, 0].transpose(0, 1), pages[:, 1].transpose(0, 1)
            mask = ctx.past_mask(seq, pages.shape[0], self.sliding_window)
            o = self._attend(q[None], k[None], v[None], mask, False)
            return o[0].transpose(0, 1).reshape(n, self.q_size)
        k = rows[:, self.q_size:self.q_size + self.kv_size].view(n, -1, d).transpose(0, 1)
        v = rows[:, self.q_size + self.kv_size:].view(n, -1, d).transpose(0, 1)
        mask = ctx.prefill_mask(seq, self.sliding_window)
        o = self._attend(q[None], k[None], v[None], mask, mask is None)  # [1, H, n, d]
        return o[0].transpose(0, 1).reshape(n, self.q_size)

    def _decode(self, qkv: torch.Tensor, ctx: StepContext, kv_cache: PagedKVCache
                ) -> torch.Tensor:
        num_decode, max_len, d = ctx.num_decode, ctx.decode_max_len, self.head_dim
        q = qkv[ctx.num_prefill_tokens:, :self.q_size]
        cache = kv_cache.layers[self.layer_idx]
        if cpu_attention.usable(cache):  # reads the pages in place: no gather, no mask
            return cpu_attention.paged_decode(q, cache, ctx.decode_blocks, ctx.decode_lens,
                                              kv_cache.block_size, self.scale,
                                              self.sliding_window, self.softcap)
        pages = kv_cache.gather_blocks(self.layer_idx, ctx.decode_blocks)
        pages = pages.view(num_decode, max_len, 2, self.num_kv_heads, d)
        k = pages[:, :, 0].transpose(1, 2)  # [B, kv_heads, max_len, d]
        v = pages[:, :, 1].transpose(1, 2)
        mask = ctx.decode_mask(self.sliding_window)
        if q.dtype == torch.float32 or self.softcap is not None:
            q = q.view(num_decode, self.num_heads, 1, d)
            o = self._attend(q, k, v, mask, False)  # [B, H, 1, d]
        else:  # CPU SDPA's GQA path is 5x slower in bf16: put a KV head's G query heads
            # where the query positions go ([B, kv_heads, G, d]), one query token each
            q = q.view(num_decode, self.num_kv_heads, -1, d)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(num_decode, self.q_size)


    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        if self.softcap is None:
            return _sdpa(q, k, v, mask, is_causal, self.scale)
        return _softcapped(q, k, v, mask, is_causal, self.scale, self.softcap)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, scale: float, cap: float) -> torch.Tensor:
    """Attention with capped scores, written out (SDPA has no soft-capping): q [B, H, n, d],
    k and v [B, kv_heads, m, d]; `mask` additive (float) or keep (bool)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, n, m]
    scores = torch.tanh(scores / cap) * cap
    if is_causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          is_causal: bool, scale: float) -> torch.Tensor:
    """SDPA with grouped K/V heads: q [B, H, n, d], k and v [B, kv_heads, m, d]."""
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale)
