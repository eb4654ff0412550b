"""Rotary position embeddings, computed from the config (no buffers: nothing to save or re-init)."""
from __future__ import annotations

import torch
from torch import nn


def _inv_freq(config, device) -> tuple[torch.Tensor, float]:
    params = config.rope_parameters or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base, dim = params["rope_theta"], config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type](config, device)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [B, T, 1, D] for given position ids, as the teacher family computes them."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._tables: dict[str, tuple[torch.Tensor, float]] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        key = str(position_ids.device)
        if key not in self._tables:
            self._tables[key] = _inv_freq(self.config, position_ids.device)
        inv_freq, scaling = self._tables[key]
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] (rotate-half convention of the Llama family), in x's dtype: under
    autocast the tables may be fp32 while q and k are half precision, and the result must not be
    promoted (v, s and g stay in the half dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
