"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek and transformers do)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order transformers uses, so bf16 results match too.
        # fp32 input skips the two casts: even no-op casts are dispatched, and decode steps are
        # bound by per-op overhead.
        xf = x if x.dtype == torch.float32 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (xf if xf.dtype == x.dtype else xf.to(x.dtype))
