"""Rotary position embeddings (the rotate-half form of every supported family).

The cos/sin table covers every position once; a step gathers the rows of its positions
once (`tables`) and every layer rotates q and k of all tokens with one call (`apply_rotary`).
"""
from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, spec, config=None) -> tuple[torch.Tensor, float]:
    """(rotation frequencies [head_dim // 2], cos/sin scale) of a RopeSpec, as transformers
    computes them: its own rope functions for every type but the default."""
    if spec.rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
        return 1.0 / (spec.theta ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[spec.rope_type](config, None,
                                                          layer_type=spec.layer_type)
    return inv_freq.float(), float(scale)


class RotaryEmbedding:
    """cos/sin tables, built for the first `INITIAL_POSITIONS` positions and grown on demand
    (a model with a 128k context should not hold 128k rows it may never use)."""

    INITIAL_POSITIONS = 4096

    def __init__(self, head_dim: int, max_positions: int, spec, config=None, *,
                 dtype: torch.dtype, device: str | torch.device):
        self.inv_freq, self.scale = inv_frequencies(head_dim, spec, config)
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
        if self.scale != 1.0:  # yarn's attention factor
            cos, sin = cos * self.scale, sin * self.scale
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
