"""RMSNorm with the residual add fused in front (one call per sub-block)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm:
    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.ones(hidden_size, dtype=dtype, device=device)

    def load(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual); with no residual, (norm(x), x)."""
        if residual is not None:
            x = x + residual  # [num_tokens, hidden]
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps), x
