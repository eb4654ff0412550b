"""Softmax attention of the teacher families (Llama, Mistral, Qwen2), and what every attention
layer of a forward pass shares: positions, padding and packed-document boundaries."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rotary import apply_rotary


class TransferErrors:
    """Attention transfer's errors of one forward: each GSA layer's per-token mean squared error
    [B, T] of its output against the teacher's softmax attention."""

    def __init__(self):
        self._by_layer: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, error: torch.Tensor) -> None:
        self._by_layer[layer_idx] = error

    def stacked(self) -> torch.Tensor:
        """[GSA layers, B, T], in layer order."""
        return torch.stack([self._by_layer[i] for i in sorted(self._by_layer)])


@dataclass
class AttentionContext:
    """Built once per model forward and read by every attention layer.

    cos, sin:   RoPE tables [B, T, 1, D] for this forward's tokens.
    key_mask:   [B, past + T] bool, False at padding (None: no padding).
    cu_seqlens: [N + 1] offsets of packed documents over the flattened B * T tokens (None: one
                sequence per row). Only without a cache.
    doc_ids:    [B, T] document index of each token, the same boundaries as cu_seqlens.
    positions:  [B, T] index of each token in the sequence the layers see (its document, when
                packed; real tokens only, when left-padded), whatever position ids the caller gave
                RoPE: the window hybrid counts the tokens older than its window with it.
    transfer:   attention transfer (None: an ordinary forward): every GSA layer passes the
                teacher's output on and adds its error to this collector.
    step:       one decoding step on a ``T2RStaticCache``: each layer reads the cache's device
                counters and writes its slot of the cache in place (nothing depends on host values,
                so the step can be captured as a CUDA graph); every row's token is real.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    transfer: TransferErrors | None = None
    step: bool = False

    def token_mask(self, T: int) -> torch.Tensor | None:
        """[B, T] bool for this forward's own tokens (None: all real)."""
        return None if self.key_mask is None else self.key_mask[:, -T:]


def softmax_mask(ctx: AttentionContext, T: int, S: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean SDPA mask [B|1, 1, T, S] for T queries over S keys (the last T are the queries),
    or None when plain causal attention over exactly these tokens (or one query over all) is right."""
    past = S - T
    windowed = window is not None and S > window
    if ctx.key_mask is None and ctx.doc_ids is None and not windowed and (past == 0 or T == 1):
        return None
    qi = torch.arange(past, S, device=device)[:, None]
    kj = torch.arange(S, device=device)[None, :]
    allowed = (kj <= qi)[None]
    if windowed:
        allowed = allowed & ((qi - kj) < window)
    if ctx.key_mask is not None:
        allowed = allowed & ctx.key_mask[:, None, :].bool()
    if ctx.doc_ids is not None:
        allowed = allowed & (ctx.doc_ids[:, :, None] == ctx.doc_ids[:, None, :])
    # A padding row sees at least itself: its output is discarded, but must not be NaN.
    allowed = allowed | (qi == kj)[None]
    return allowed[:, None]


class SoftmaxAttention(nn.Module):
    """The teacher's attention block: q/k/v/o projections (names kept for LoRA and weight
    loading), RoPE, GQA, optional sliding window; a KV cache when generating."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=config.o_bias)
        self.window = config.window(layer_idx)

    def project(self, x: torch.Tensor, ctx: AttentionContext, rope: bool = True):
        """q [B, T, HQ, D], k and v [B, T, H, D], RoPE applied to q and k when ``rope``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if rope:
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        return q, k, v

    def softmax_forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx)
        if ctx.step:
            return self.o_proj(self._step_attention(q, k, v, cache).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        S = k.shape[1]
        mask = softmax_mask(ctx, T, S, self.window, x.device)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None and T > 1, scale=self.head_dim ** -0.5,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _step_attention(self, q, k, v, cache) -> torch.Tensor:
        """One decoding step on a static cache: write this token's key and value at the step's
        column, attend over every real column so far (within the teacher's window, if any)."""
        kb, vb, valid = cache.kv_buffers(self.layer_idx)
        col = cache.step_index
        kb.index_copy_(1, col, k)
        vb.index_copy_(1, col, v)
        cols = torch.arange(kb.shape[1], device=kb.device)
        allowed = valid & (cols <= col)
        if self.window is not None:
            allowed = allowed & (cols > col - self.window)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=allowed[:, None, None, :],
            scale=self.head_dim ** -0.5, enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        return self.softmax_forward(x, ctx, cache)
