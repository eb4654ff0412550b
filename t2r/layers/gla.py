"""GatedLinearAttention: the ``gla`` and ``linear`` mixers, the alternatives to GSA at conversion.

Both keep the teacher's q/k/v/o projections and hold one state S [D, D] per kv head:

    S_t = Diag(a_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t       (scale 1/sqrt(D))
    q, k = RoPE(phi(q)), RoPE(phi(k)) with ``use_rope`` (else phi(q), phi(k))
    out  = o_proj(RMSNorm(o))  per head with ``output_norm`` (else o_proj(o))

- ``gla`` (Gated Linear Attention, Yang et al. 2024): a data-dependent forget gate per key
  dimension from a new low-rank projection ``gk_proj`` (hidden -> ``gate_rank`` -> H * D, with a
  bias), log a_t = logsigmoid(gk_proj(x)) / tau (tau: ``gate_logit_normalizer``). The up
  projection starts at zero and its bias so that the gates start near 1: a constant per key
  dimension with 1 - a spread geometrically over [2^-10, 2^-5] (memories of ~30 to ~1000 tokens),
  which training then makes data-dependent.
- ``linear`` (SUPRA, Mercat et al. 2024): no new parameter but the feature maps and the norm; the
  gate is a fixed decay per kv head h, RetNet's gamma_h = 1 - 2^(-5 - h) (``linear_decay: retnet``),
  or none (``linear_decay: none``: plain causal linear attention). As SUPRA does, the output is
  normalised per head (SUPRA's GroupNorm, here the RMSNorm ``g_norm``) instead of dividing by the
  sum of the decayed keys (unstable, and undefined for feature maps that are not positive).

RoPE goes on *after* the feature map (SUPRA's order): RoPE(phi(q)) . RoPE(phi(k)) depends on the
positions only through their distance, for any phi. The output norm has no SiLU (GSA's has one).

The rest is GSA's (``gsa.py``): the window hybrid (exact softmax over the last W tokens, this
mixer over older ones), attention transfer, teacher mode, padding (a padded token neither writes
nor decays the state: its write weight s and its gate are 0), packed documents (state reset per
document) and decoding through ``T2RCache`` with a fixed-size state (a 1-tuple (S,) per layer).
The operator is ``t2r.kernels.gla`` (its ``ops.py`` says which implementation runs and why: fla's
Triton kernels on CUDA when installed, else torch; ``gsa_backend`` picks for every mixer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2r.kernels.gla import chunk_gla, fused_recurrent_gla

from .attention import AttentionContext
from .gsa import GatedSlotAttention
from .rotary import apply_rotary

# gla: the gates' starting memories, 1 - a from 2^-5 to 2^-10 across the key dimensions
GATE_INIT_RANGE = (5.0, 10.0)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def retnet_decays(heads: int, device=None) -> torch.Tensor:
    """log gamma_h of RetNet's fixed decays gamma_h = 1 - 2^(-5 - h), fp32 [heads], made on ``device``
    (no host-to-device copy: a decoding step captured as a CUDA graph may not make one)."""
    return torch.log1p(-torch.exp2(-5.0 - torch.arange(heads, dtype=torch.float32, device=device)))


class LowRankGate(nn.Module):
    """GLA's gate logits: ``up(down(x))``, hidden -> rank -> heads * head_dim (with a bias)."""

    def __init__(self, hidden: int, rank: int, out: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class GatedLinearAttention(GatedSlotAttention):
    """A converted attention block running the ``gla`` or ``linear`` mixer (module docstring)."""

    fused_decode = False  # GSA's fused decoding step takes slot gates; this mixer's steps go through _gsa

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mixer = config.mixer
        self.f_proj = None  # GSA's slot gate: this mixer gates the key dimensions instead
        self.num_slots = None
        self.gk_proj = LowRankGate(config.hidden_size, config.gate_rank, self.num_kv_heads * self.head_dim) \
            if self.mixer == "gla" else None
        self.norm_activation = _identity  # o_proj(RMSNorm(o)): no SiLU (module docstring)

    @torch.no_grad()
    def init_new_parameters(self, generator: torch.Generator | None = None, f_proj_init: str = "key") -> None:
        """GSA's (feature maps, norm, window mix), and for ``gla`` the gate: ``down`` random, ``up``
        zero and its bias so that every gate starts near 1 (module docstring)."""
        super().init_new_parameters(generator, f_proj_init)
        if self.gk_proj is None:
            return
        down, up = self.gk_proj.down.weight, self.gk_proj.up
        down.copy_((torch.randn(down.shape, generator=generator) * self.config.initializer_range).to(down))
        up.weight.zero_()
        lo, hi = GATE_INIT_RANGE
        log_a = torch.log1p(-torch.pow(2.0, -torch.linspace(lo, hi, self.head_dim, dtype=torch.float64)))
        keep = torch.exp(self.tau * log_a)  # sigmoid(bias) = a^tau, so that logsigmoid(bias) / tau = log a
        bias = torch.log(keep) - torch.log1p(-keep)
        up.bias.copy_(bias.repeat(self.num_kv_heads).to(up.bias))

    def log_gates(self, x: torch.Tensor) -> torch.Tensor:
        """log a [B, T, H, D] in fp32 (<= 0)."""
        B, T, _ = x.shape
        shape = (B, T, self.num_kv_heads, self.head_dim)
        if self.gk_proj is not None:
            return F.logsigmoid(self.gk_proj(x).float()).view(shape) / self.tau
        if self.config.linear_decay == "none":
            return x.new_zeros(shape, dtype=torch.float32)
        return retnet_decays(self.num_kv_heads, x.device)[:, None].expand(shape)

    def gsa_inputs(self, x: torch.Tensor, ctx: AttentionContext):
        """(q, k, v, s, g) for the operator: q [B, T, HQ, D], k, v and g [B, T, H, D], s [B, T, H, 1]
        the write weight (1, 0 at padding); plus the teacher's RoPE'd q and k and raw v (window)."""
        T = x.shape[1]
        q0, k0, v0 = self.project(x, ctx, rope=False)
        g = self.log_gates(x)
        s = g.new_ones(*g.shape[:3], 1)
        mask = ctx.token_mask(T)
        if mask is not None:  # padding must neither write nor decay the state
            keep = mask[:, :, None, None].to(g.dtype)
            s, g = s * keep, g * keep
        qr, kr = (apply_rotary(q0, ctx.cos, ctx.sin), apply_rotary(k0, ctx.cos, ctx.sin)) if self.window_size \
            else (None, None)  # the window's (only it reads the teacher's RoPE'd q and k)
        dt = v0.dtype
        q, k = self.q_map(q0).to(dt), self.k_map(k0).to(dt)
        if self.use_rope:
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        return (q, k, self.v_activation(v0), s.to(dt), g.to(dt)), (qr, kr, v0)

    @torch.compiler.disable  # as GatedSlotAttention._gsa: outside torch.compile's graphs
    def _gsa(self, q, k, v, s, g, ctx: AttentionContext, state, want_state: bool):
        B, T = q.shape[:2]
        k = k * s  # the write weight: no write at padding, nor (window hybrid) before a document starts
        if ctx.cu_seqlens is not None:  # packed documents: one long row, state reset per document
            q, k, v, g = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g))
        op = fused_recurrent_gla if (state is not None and T == 1) else chunk_gla
        o, final = op(q, k, v, g, scale=self.scale, initial_state=None if state is None else state[0],
                      output_final_state=want_state, cu_seqlens=ctx.cu_seqlens, backend=self.backend)
        return o.reshape(B, T, self.num_heads, -1), (None if final is None else (final,))

    def extra_repr(self) -> str:
        gate = f"gate rank {self.config.gate_rank}" if self.gk_proj is not None else \
            f"decay {self.config.linear_decay}"
        return f"mixer={self.mixer}, {gate}, heads={self.num_heads}, kv_heads={self.num_kv_heads}"

