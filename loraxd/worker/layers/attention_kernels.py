"""Triton kernels for PagedAttention (launched by triton_attention.py). Decode reads K/V
straight from the cache pages through the page table (no gather into a padded copy);
prefill runs every prompt of the step in one launch over the step's own rows of qkv (a
prompt never reads the cache: no prefix sharing).

Both are flash-attention loops (online softmax, fp32 statistics) with the torch path's
semantics: grouped K/V heads, an optional sliding window (a token sees the `window` newest
positions up to itself) and soft-capped scores (`cap * tanh(s / cap)`, Gemma 2).
A decode program takes one sequence and one KV head with its group of query heads, so each
page is read once per KV head. `UPCAST`: see triton_common.mm.
"""
from __future__ import annotations

import triton
import triton.language as tl

from loraxd.worker.triton_common import mm, tanh


@triton.jit
def _online_softmax_step(s, valid, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """Fold scores s [M, N] (masked by `valid`) and values v [N, D] into the running max,
    sum and output; rows with nothing valid yet keep m = -inf and add nothing."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    s = mm(q, tl.trans(k), UPCAST) * scale
    if HAS_SOFTCAP:
        s = softcap * tanh(s / softcap)
    return s


@triton.jit
def decode_attention(q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr,
                     stride_q, stride_out, stride_table, scale, window, softcap,
                     KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (num_decode, KV_HEADS). q [num_decode, heads * d] (row stride stride_q); the
    layer's cache [slots, 2, KV_HEADS, d]; table [num_decode, max_blocks] page ids;
    lens [num_decode] context lengths including the new token."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gd_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_q + heads[:, None] * HEAD_DIM + d[None, :], mask=gd_ok,
                other=0.0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    stride_slot = 2 * KV_HEADS * HEAD_DIM
    for n0 in range(lo, seq_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < seq_len
        if HAS_WINDOW:
            valid &= n >= seq_len - window
        page = tl.load(table_ptr + b * stride_table + n // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + n % PAGE
        kv_ok = valid[:, None] & (d < HEAD_DIM)[None, :]
        k_at = cache_ptr + slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
        k = tl.load(k_at, mask=kv_ok, other=0.0)
        v = tl.load(k_at + KV_HEADS * HEAD_DIM, mask=kv_ok, other=0.0)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP, UPCAST)
        m_i, l_i, acc = _online_softmax_step(s, valid[None, :], v, m_i, l_i, acc, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # 0: a padding row, not stored
    tl.store(out_ptr + b * stride_out + heads[:, None] * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gd_ok)


@triton.jit
def prefill_attention(qkv_ptr, out_ptr, start_ptr, first_ptr, len_ptr,
                      stride_qkv, stride_out, scale, window, softcap,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      UPCAST: tl.constexpr):
    """Grid (num_blocks, HEADS). Block i: query rows first[i] .. + BLOCK_M of the prompt whose
    tokens are rows start[i] .. + len[i] of qkv [num_tokens, q | k | v]; causal."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (HEADS // KV_HEADS)
    start = tl.load(start_ptr + i).to(tl.int64)
    first = tl.load(first_ptr + i)
    seq_len = tl.load(len_ptr + i)
    m = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(qkv_ptr + (start + m[:, None]) * stride_qkv + h * HEAD_DIM + d[None, :],
                mask=(m < seq_len)[:, None] & d_ok[None, :], other=0.0)
    k_col = HEADS * HEAD_DIM + kvh * HEAD_DIM
    v_col = (HEADS + KV_HEADS) * HEAD_DIM + kvh * HEAD_DIM
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(first + BLOCK_M, seq_len)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (n < seq_len)[:, None] & d_ok[None, :]
        rows = (start + n[:, None]) * stride_qkv + d[None, :]
        k = tl.load(qkv_ptr + rows + k_col, mask=kv_ok, other=0.0)
        v = tl.load(qkv_ptr + rows + v_col, mask=kv_ok, other=0.0)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP, UPCAST)
        valid = (n[None, :] <= m[:, None]) & (n < seq_len)[None, :]
        if HAS_WINDOW:
            valid &= m[:, None] - n[None, :] < window
        m_i, l_i, acc = _online_softmax_step(s, valid, v, m_i, l_i, acc, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # 0: a padding row, not stored
    tl.store(out_ptr + (start + m[:, None]) * stride_out + h * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(m < seq_len)[:, None] & d_ok[None, :])
