"""The small per-layer ops of small_ops.cpp: residual add + RMSNorm, silu(gate) * up, and
rotary with the K/V cache write, one call each where the torch code runs several ops (at
decode sizes their dispatch, not their arithmetic, is the cost); and the sampler's argmax
with logsumexp over a step's logits (greedy_pick.cpp). The layers call them when
`covers` says so and keep their torch code otherwise (other devices and dtypes, no library,
`ENABLED` off)."""
from __future__ import annotations

import torch

from loraxd.worker import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)
ENABLED = True  # False: every layer runs its torch code (tests, in-process A/B timing)


def covers(x: torch.Tensor) -> bool:
    """The ops take x: on CPU, fp32 or bf16, its last dimension contiguous, the library
    loaded."""
    return (ENABLED and x.is_cpu and x.dtype in DTYPES and x.stride(-1) == 1
            and cpu_kernels.enable() is None)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * norm(x + residual), x + residual) as RMSNorm.forward, x [rows, n] (without
    a residual also [rows, heads, n]); weight fp32 (then norm(.) is not rounded to x's dtype
    first) or x's dtype."""
    if residual is None:
        return torch.ops.loraxd_cpu.rms_norm(x, weight, eps), x
    return torch.ops.loraxd_cpu.add_rms_norm(x, residual, weight, eps)


def rms_norm_(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """x = weight * norm(x) in place; x [rows, n] or [rows, heads, n], any strides but the last."""
    torch.ops.loraxd_cpu.rms_norm_(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :n]) * gate_up[:, n:] -> [rows, n] (rows contiguous, any row stride)."""
    return torch.ops.loraxd_cpu.silu_mul(gate_up)


def rotary_(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
            sin: torch.Tensor, cache: torch.Tensor | None = None,
            slots: torch.Tensor | None = None) -> None:
    """Rotate the q and k heads of qkv [tokens, q|k|v] in place (cos/sin as
    RotaryEmbedding.tables gives them); with `cache` [slots, 2, kv_heads, head_dim] of
    qkv's dtype, then write each token's k|v to its slot in `slots` [tokens]."""
    torch.ops.loraxd_cpu.rotary_(qkv, heads, kv_heads, head_dim, cos, sin, cache, slots)


def argmax_logsumexp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [rows], logsumexp [rows, 1]) of scores [rows, vocab], as torch's argmax and
    logsumexp give them (the sum within a few ulps)."""
    if covers(scores) and scores.dtype == torch.float32 and scores.dim() == 2:
        index, _, lse = torch.ops.loraxd_cpu.greedy_pick(scores)
        return index, lse[:, None]
    return scores.argmax(-1), torch.logsumexp(scores, -1, keepdim=True)
