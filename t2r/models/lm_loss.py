"""Next-token cross-entropy over a model's logits without an fp32 copy of them.

``F.cross_entropy(logits.float(), ...)`` (what transformers' causal LMs compute) makes an fp32 copy
of the logits, keeps their fp32 log-softmax for the backward (4 bytes per logit on top of the bf16
logits: for 16k tokens and a 32k vocabulary, 2 GiB), and its backward makes fp32 gradients of the
same size. :func:`token_cross_entropy` computes the same losses and gradients in fp32 a block of
rows at a time: it keeps only the logits (in their own dtype) and one fp32 log-normaliser per row,
and writes the gradient straight into the logits' dtype.
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 25  # logits upcast at once: 128 MiB of fp32


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, rows: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = torch.empty(n, dtype=torch.float32, device=logits.device)
        valid = target != -100
        index = torch.where(valid, target, 0)[:, None]
        for i in range(0, n, rows):
            x = logits[i:i + rows].float()
            lse[i:i + rows] = torch.logsumexp(x, -1)
            picked[i:i + rows] = x.gather(1, index[i:i + rows]).squeeze(1)
        ctx.save_for_backward(logits, index, valid, lse)
        ctx.rows = rows
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, index, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_loss.float(), 0.0)
        grad = torch.empty_like(logits)
        rows = ctx.rows
        for i in range(0, logits.shape[0], rows):
            p = torch.exp(logits[i:i + rows].float() - lse[i:i + rows, None])  # softmax
            p.scatter_add_(1, index[i:i + rows], torch.full_like(lse[i:i + rows, None], -1.0))
            grad[i:i + rows] = p.mul_(scale[i:i + rows, None])
        return grad, None, None


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy [N] in fp32 of ``logits`` [N, V] (any float dtype) against ``target`` [N]
    (-100: no target, loss 0): the values and gradients of ``F.cross_entropy(logits.float(), target,
    reduction="none")``. ``rows``: rows upcast at a time (default: 128 MiB of fp32)."""
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}")
    rows = rows or max(1, BLOCK_ELEMENTS // max(1, logits.shape[1]))
    return _TokenCrossEntropy.apply(logits, target.long(), rows)
