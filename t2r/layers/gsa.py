"""GatedSlotAttention: the T2R layer that replaces a teacher's softmax attention.

It keeps the teacher's q/k/v/o projections and adds only ``f_proj`` (one gate logit per slot
per kv head) and ``g_norm`` (an fp32 RMSNorm over each head's output):

    g = logsigmoid(f_proj(x)) / tau,   s = 1 - exp(g)
    o = o_proj(RMSNorm(silu(GSA(phi(q), phi(k), act(v), s, g))))

The operator runs only through ``t2r.kernels.gsa`` (Triton on CUDA, torch on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2r.kernels.gsa import chunk_gsa, fused_recurrent_gsa

from .attention import AttentionContext, SoftmaxAttention
from .norm import RMSNorm

FEATURE_MAP_FNS = {
    "swish": F.silu,
    "relu": F.relu,
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
}


def slot_gates(gate_logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, g) from gate logits: log forget gate g = logsigmoid(x) / tau <= 0, write weight
    s = 1 - exp(g) (forgetting and writing tied), both fp32."""
    g = F.logsigmoid(gate_logits.float()) / tau
    return -torch.expm1(g), g


class GatedSlotAttention(SoftmaxAttention):
    """A converted attention block. ``as_teacher = True`` makes it run the teacher's softmax
    attention with the same weights (for distillation), without a second copy of them."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_slots = config.num_slots
        self.f_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.num_slots, bias=False)
        self.g_norm = RMSNorm(self.head_dim, eps=config.gsa_norm_eps) if config.output_norm else None
        self.feature_map = FEATURE_MAP_FNS[config.feature_map]
        self.v_activation = F.silu if config.v_activation == "silu" else (lambda x: x)
        self.scale = config.gsa_logit_scale
        self.tau = config.gate_logit_normalizer
        self.use_rope = config.use_rope
        self.backend = None if config.gsa_backend == "auto" else config.gsa_backend
        self.as_teacher = False  # run the teacher's softmax attention instead
        self.transfer = False  # attention transfer (see transfer_forward)
        self.transfer_error: torch.Tensor | None = None

    def gsa_inputs(self, x: torch.Tensor, ctx: AttentionContext):
        """q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, D], s and g [B, T, H, M] for the operator."""
        B, T, _ = x.shape
        q, k, v = self.project(x, ctx, rope=self.use_rope)
        q, k, v = self.feature_map(q), self.feature_map(k), self.v_activation(v)
        s, g = slot_gates(self.f_proj(x).view(B, T, self.num_kv_heads, self.num_slots), self.tau)
        mask = ctx.token_mask(T)
        if mask is not None:  # padding must neither write nor decay the state
            keep = mask[:, :, None, None].to(s.dtype)
            s, g = s * keep, g * keep
        dt = q.dtype
        return q, k, v, s.to(dt), g.to(dt)

    def gsa_forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v, s, g = self.gsa_inputs(x, ctx)
        if ctx.cu_seqlens is not None:  # packed documents: one long row, state reset per document
            q, k, v, s, g = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, s, g))
        state = cache.gsa_state(self.layer_idx) if cache is not None else None
        op = fused_recurrent_gsa if (state is not None and T == 1) else chunk_gsa
        o, final = op(q, k, v, s, g, scale=self.scale, initial_state=state,
                      output_final_state=cache is not None, cu_seqlens=ctx.cu_seqlens, backend=self.backend)
        if cache is not None:
            cache.set_gsa_state(self.layer_idx, final)
        o = o.reshape(B, T, self.num_heads, self.head_dim)
        if self.g_norm is not None:
            o = self.g_norm(F.silu(o))
        return self.o_proj(o.reshape(B, T, -1))

    def transfer_forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Attention transfer: return the teacher's output (so the next layer sees the teacher's
        hidden states) and keep this layer's per-token squared error [B, T] in ``transfer_error``."""
        with torch.no_grad():
            teacher = self.softmax_forward(x, ctx)
        student = self.gsa_forward(x.detach(), ctx)
        self.transfer_error = (student.float() - teacher.float()).pow(2).mean(-1)
        return teacher

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        if self.as_teacher:
            return self.softmax_forward(x, ctx, cache)
        if self.transfer:
            return self.transfer_forward(x, ctx)
        return self.gsa_forward(x, ctx, cache)
