"""Triton kernels for batched heterogeneous LoRA over the slot pool's layout (see slots.py).

Shrink: h[t, :r_tot] = A_cat(slot(t)) x[t], where slot s's `A_cat^T [in, r_tot]` sits
row-major at `a[s]`; r_tot differs per slot (and per layer), so it comes from a table.
Expand: y[t, col_j + n] += sum_r h[t, hoff_j + r] B_j^T[s * max_rank + r, n] for each
module j of the group the slot targets (rank r_j > 0), h in fp32.

Two shapes of work, each as a shrink and an expand:
* per token (BGMV, decode): one program per listed token gathers its adapter's weights;
  vector products, no tensor cores (a token is one row).
* per segment block (SGMV, prefill): a block of up to BLOCK_M consecutive tokens of one
  adapter; tile products with `tl.dot`. Blocks are listed by the host, so uneven segments
  waste no programs.

Rows of y whose token has no adapter are never touched: a listed token of slot -1 (a CUDA
graph lists every row of its batch) reads rank 0 and does nothing. `UPCAST`: see
triton_common.mm.
"""
from __future__ import annotations

import triton
import triton.language as tl

from loraxd.worker.triton_common import mm


@triton.jit
def _module_of(j, b0, b1, b2, out0, out1, out2):
    """The B table, width and first column of module j (of up to 3) of a group."""
    b_ptr, out, col = b0, out0, 0
    if j == 1:
        b_ptr, out, col = b1, out1, out0
    if j == 2:
        b_ptr, out, col = b2, out2, out0 + out1
    return b_ptr, out, col


@triton.jit
def shrink_tokens(x_ptr, a_ptr, h_ptr, tok_ptr, slot_ptr, rtot_ptr,
                  stride_x, stride_a, stride_h, in_features,
                  BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (num_listed_tokens, cdiv(cap, BLOCK_R))."""
    i = tl.program_id(0)
    t = tl.load(tok_ptr + i).to(tl.int64)
    s = tl.load(slot_ptr + i).to(tl.int64)
    r_tot = tl.load(rtot_ptr + s, mask=s >= 0, other=0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < r_tot
    k_end = tl.where(tl.program_id(1) * BLOCK_R < r_tot, in_features, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        xk = tl.load(x_ptr + t * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + s * stride_a + k[:, None] * r_tot + r[None, :],
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xk[:, None] * a, axis=0)
    tl.store(h_ptr + t * stride_h + r, acc, mask=r_ok)


@triton.jit
def expand_tokens(h_ptr, y_ptr, tok_ptr, slot_ptr, rank_ptr, hoff_ptr,
                  b0, b1, b2, out0, out1, out2, stride_h, stride_y, max_rank,
                  NUM_MODULES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (num_listed_tokens, NUM_MODULES, cdiv(max out, BLOCK_N))."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    t = tl.load(tok_ptr + i).to(tl.int64)
    s = tl.load(slot_ptr + i).to(tl.int64)
    rank = tl.load(rank_ptr + s * NUM_MODULES + j, mask=s >= 0, other=0)
    hoff = tl.load(hoff_ptr + s * NUM_MODULES + j, mask=s >= 0, other=0)
    b_ptr, out, col = _module_of(j, b0, b1, b2, out0, out1, out2)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out
    r_end = tl.where(tl.program_id(2) * BLOCK_N < out, rank, 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        h = tl.load(h_ptr + t * stride_h + hoff + r, mask=r_ok, other=0.0)
        b = tl.load(b_ptr + (s * max_rank + r[:, None]) * out + n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(h[:, None] * b, axis=0)
    if r_end > 0:
        y_at = y_ptr + t * stride_y + col + n
        y = tl.load(y_at, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_at, (y + acc).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def shrink_blocks(x_ptr, a_ptr, h_ptr, row_ptr, nrows_ptr, slot_ptr, rtot_ptr,
                  stride_x, stride_a, stride_h, in_features,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Grid (num_blocks, cdiv(cap, BLOCK_R)); block i: rows row[i] .. + nrows[i] of slot[i]."""
    i = tl.program_id(0)
    row0 = tl.load(row_ptr + i).to(tl.int64)
    nrows = tl.load(nrows_ptr + i)
    s = tl.load(slot_ptr + i).to(tl.int64)
    r_tot = tl.load(rtot_ptr + s)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < nrows
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < r_tot
    k_end = tl.where(tl.program_id(1) * BLOCK_R < r_tot, in_features, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        x = tl.load(x_ptr + (row0 + m[:, None]) * stride_x + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + s * stride_a + k[:, None] * r_tot + r[None, :],
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += mm(x.to(a.dtype), a, UPCAST)
    tl.store(h_ptr + (row0 + m[:, None]) * stride_h + r[None, :], acc,
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def expand_blocks(h_ptr, y_ptr, row_ptr, nrows_ptr, slot_ptr, rank_ptr, hoff_ptr,
                  b0, b1, b2, out0, out1, out2, stride_h, stride_y, max_rank,
                  NUM_MODULES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (num_blocks, NUM_MODULES, cdiv(max out, BLOCK_N))."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    row0 = tl.load(row_ptr + i).to(tl.int64)
    nrows = tl.load(nrows_ptr + i)
    s = tl.load(slot_ptr + i).to(tl.int64)
    rank = tl.load(rank_ptr + s * NUM_MODULES + j)
    hoff = tl.load(hoff_ptr + s * NUM_MODULES + j)
    b_ptr, out, col = _module_of(j, b0, b1, b2, out0, out1, out2)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < nrows
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out
    r_end = tl.where(tl.program_id(2) * BLOCK_N < out, rank, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        b = tl.load(b_ptr + (s * max_rank + r[:, None]) * out + n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        h = tl.load(h_ptr + (row0 + m[:, None]) * stride_h + hoff + r[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc += mm(h.to(b.dtype), b, UPCAST)  # h rounded as the torch path rounds it
    if r_end > 0:
        y_at = y_ptr + (row0 + m[:, None]) * stride_y + col + n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_at, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)
