"""Rotary position embeddings (the rotate-half form of Llama, Mistral and Qwen2).

The cos/sin table covers every position once; a step gathers the rows of its positions
once (`tables`) and every layer rotates q and k of all tokens with one call (`apply_rotary`).
"""
from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def inv_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """The rotation frequencies [head_dim // 2], as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = rope_type(rope_scaling)
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, rope_scaling)
    if kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables, built for the first `INITIAL_POSITIONS` positions and grown on demand
    (a model with a 128k context should not hold 128k rows it may never use)."""

    INITIAL_POSITIONS = 4096

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 rope_scaling: dict | None, *, dtype: torch.dtype, device: str | torch.device):
        self.inv_freq = inv_frequencies(head_dim, theta, rope_scaling)
        self.max_positions = max_positions
        self.dtype, self.device = dtype, device
        self.num_cached = 0
        self.ensure(min(max_positions, self.INITIAL_POSITIONS))

    def ensure(self, num_positions: int) -> None:
        """Make the tables cover positions [0, num_positions)."""
        if num_positions <= self.num_cached:
            return
        num_positions = max(num_positions, 2 * self.num_cached)
        positions = torch.arange(num_positions, dtype=torch.float)
        freqs = torch.outer(positions, self.inv_freq)  # [num_positions, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        # [num_positions, head_dim]: cos|cos and -sin|sin, so x*cos + swap_halves(x)*sin
        # equals transformers' x*cos + rotate_half(x)*sin bit for bit
        self.cos = torch.cat((cos, cos), -1).to(dtype=self.dtype, device=self.device)
        self.sin = torch.cat((-sin, sin), -1).to(dtype=self.dtype, device=self.device)
        self.num_cached = num_positions

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the step's tokens, each [num_tokens, 1, head_dim]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [num_tokens, num_heads, head_dim] in place (it may be a view into qkv)."""
    num_tokens, num_heads, head_dim = x.shape
    swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(2)
    swapped = swapped.view(num_tokens, num_heads, head_dim).mul_(sin)
    x.mul_(cos).add_(swapped)
