"""Feature maps phi for the queries and keys of a GSA layer: parameter-free ones and learnable ones.

GSA reads its slots through a softmax over ``scale * phi(q) . K~`` where each slot key K~ is a
gated average of phi(k); with ``identity`` (and the teacher's RoPE and scale) the slot logits are
the teacher's attention logits averaged over the tokens each slot holds, so a converted layer
starts close to its teacher. The other maps:

- ``softmax``: softmax over the head dimension, no parameters (Liger's GLA feature map).
- ``linear``: a learnable per-head D x D map, initialised to the identity: the same start as
  ``identity``, with the query/key side free to adapt during attention transfer.
- ``hedgehog``: learnable, Hedgehog-style (LoLCATs): per head ``z = x W`` (D -> D/2, initialised to
  the first D/2 coordinates) and ``phi = [softmax(z), softmax(-z)]`` (D features).
- ``swish``, ``relu``, ``elu1``: the GSA paper's and earlier linear attentions' maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2r.conversion_limits import FEATURE_MAPS

FIXED = {
    "swish": F.silu,
    "relu": F.relu,
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    "softmax": lambda x: F.softmax(x.float(), dim=-1).to(x.dtype),
}
LEARNABLE = ("linear", "hedgehog")  # FIXED and LEARNABLE implement conversion_limits.FEATURE_MAPS


class FixedFeatureMap(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fn = FIXED[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.kind


class LearnableFeatureMap(nn.Module):
    """Per-head map of x [B, T, heads, D]: ``linear`` (x W, W [heads, D, D]) or ``hedgehog``
    ([softmax(x W), softmax(-x W)], W [heads, D, D/2]). ``reset_parameters`` gives the identity
    (linear) or the first D/2 coordinates (hedgehog)."""

    def __init__(self, kind: str, heads: int, dim: int):
        super().__init__()
        if kind == "hedgehog" and dim % 2:
            raise ValueError(f"the hedgehog feature map needs an even head_dim, got {dim}")
        self.kind = kind
        out = dim if kind == "linear" else dim // 2
        self.weight = nn.Parameter(torch.empty(heads, dim, out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            idx = torch.arange(self.weight.shape[-1])
            self.weight[:, idx, idx] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))
        if self.kind == "linear":
            return z
        z = z.float()
        return torch.cat([F.softmax(z, -1), F.softmax(-z, -1)], -1).to(x.dtype)

    def extra_repr(self) -> str:
        h, d, e = self.weight.shape
        return f"{self.kind}, heads={h}, {d} -> {d if self.kind == 'linear' else 2 * e}"


def make_feature_map(kind: str, heads: int, dim: int) -> nn.Module:
    if kind in LEARNABLE:
        return LearnableFeatureMap(kind, heads, dim)
    if kind not in FIXED:
        raise ValueError(f"feature_map={kind!r} is not one of {', '.join(FEATURE_MAPS)}")
    return FixedFeatureMap(kind)
