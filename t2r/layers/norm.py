"""RMSNorm as the Llama family computes it (fp32 statistics, weight applied in the input dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm normalises in fp32 for half inputs and rounds once, as the Llama family does,
        # in one fused kernel on CUDA (six elementwise kernels and two casts unfused). CUDA autocast runs it in
        # fp32, hence the cast back to x's dtype.
        dtype, eps = x.dtype, self.variance_epsilon
        if self.weight.dtype == dtype:
            return self.weight * F.rms_norm(x, x.shape[-1:], eps=eps).to(dtype)
        return (self.weight.float() * F.rms_norm(x.float(), x.shape[-1:], eps=eps)).to(dtype)
