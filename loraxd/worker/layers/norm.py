"""RMSNorm with the residual add fused in front (one call per sub-block)."""
from __future__ import annotations

import torch


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
        """Return (norm(x + residual), x + residual); with no residual, (norm(x), x).

        Written out as transformers does (in fp32; for fp32 bit for bit what `F.rms_norm`
        gives, which on a CPU is a composite of about ten ops, copies included): measured
        ~0.5 ms faster per decode step of the 30-layer default model.
        """
        if residual is not None:
            x = x + residual  # [num_tokens, hidden]
        x32 = x if x.dtype == torch.float32 else x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)  # [num_tokens, 1]
        normed = x32 * variance.add_(self.eps).rsqrt_()  # [num_tokens, hidden]
        if normed.dtype != x.dtype:
            normed = normed.to(x.dtype)
        return self.weight * normed, x
