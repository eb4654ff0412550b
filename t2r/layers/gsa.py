"""GatedSlotAttention: the T2R layer that replaces a teacher's softmax attention.

It keeps the teacher's q/k/v/o projections. Per kv head, M slots hold gated averages of the
keys and values; a query reads them through a softmax over the slots:

    g = logsigmoid(gate_logits) / tau,   s = 1 - exp(g)        (forget and write tied)
    o = o_proj(norm(GSA(phi(q), phi(k), act(v), s, g)))

Conversion options (``T2RConfig``) choose each part: the feature map phi (fixed or learnable,
``feature_maps.py``), RoPE kept or dropped before it, the gate logits from a new ``f_proj``
(hidden -> H * M) or pooled from the key projection (no new parameter), SiLU or identity on v,
the paper's output norm ``RMSNorm(silu(o))`` or none.

With ``window_size`` W > 0 the layer is a hybrid inside itself: exact softmax attention (the
teacher's, RoPE and scale included) over the last W tokens, and GSA over every older token
(its state lags W tokens behind). The two are mixed as a single softmax would weigh them:

    w = sigmoid(lse_window - (theta_h + log n_old)),   o = w * o_window + (1 - w) * o_gsa

where lse_window is the log-normaliser of the window's scores, n_old the number of tokens older
than the window, and ``theta_h`` (``window_mix``, one per query head) a learned estimate of the
log mean weight of an old token. The state stays fixed-size: decoding keeps the last W tokens
in a ring buffer beside the GSA state.

The operator runs only through ``t2r.kernels.gsa`` (Triton on CUDA, torch on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2r.kernels.gsa import chunk_gsa, fused_recurrent_gsa
from t2r.kernels.gsa.decode_step import ACTIVATIONS, gsa_decode_step

from .attention import AttentionContext, SoftmaxAttention
from .feature_maps import FixedFeatureMap, LearnableFeatureMap, make_feature_map
from .norm import RMSNorm
from .rotary import apply_rotary
from .window import ring_window_attention, window_attention


def slot_gates(gate_logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, g) from gate logits: log forget gate g = logsigmoid(x) / tau <= 0, write weight
    s = 1 - exp(g) (forgetting and writing tied), both fp32."""
    g = F.logsigmoid(gate_logits.float()) / tau
    return -torch.expm1(g), g


def pool_heads(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool the last dim of x [..., D] to ``size`` (adaptive windows, as Liger pools keys)."""
    if x.shape[-1] == size:
        return x
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), size).reshape(*lead, size)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] delayed by n positions along T (zeros in front)."""
    if n >= x.shape[1]:
        return torch.zeros_like(x)
    return torch.cat([x.new_zeros(x.shape[0], n, *x.shape[2:]), x[:, :-n]], 1)


class HeadScalars(nn.Module):
    """One learned number per head (``weight`` [heads]); a module so LoRA runs can save it."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads))


class GatedSlotAttention(SoftmaxAttention):
    """A converted attention block. ``as_teacher = True`` makes it run the teacher's softmax
    attention with the same weights (for distillation), without a second copy of them."""

    fused_decode = True  # one-token steps through gsa_decode_step (the gla/linear subclass: no)

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_slots = M = config.num_slots
        self.f_proj = nn.Linear(config.hidden_size, self.num_kv_heads * M, bias=False) \
            if config.gate_source == "f_proj" else None
        self.q_map = make_feature_map(config.feature_map, self.num_heads, self.head_dim)
        self.k_map = make_feature_map(config.feature_map, self.num_kv_heads, self.head_dim)
        self.g_norm = RMSNorm(self.head_dim, eps=config.gsa_norm_eps) if config.output_norm else None
        self.norm_activation = F.silu  # o_proj(RMSNorm(silu(o))): the GSA paper's output norm
        self.v_activation = F.silu if config.v_activation == "silu" else (lambda x: x)
        self.v_activation_name = config.v_activation
        self.scale = config.gsa_logit_scale
        self.tau = config.gate_logit_normalizer
        self.use_rope = config.use_rope
        self.window_size = config.window_size
        self.window_mix = HeadScalars(self.num_heads) if self.window_size else None
        self.backend = None if config.gsa_backend == "auto" else config.gsa_backend
        self.as_teacher = False  # run the teacher's softmax attention instead
        self.branches = {"window": True, "gsa": True}  # inference ablation of a windowed layer

    @torch.no_grad()
    def init_new_parameters(self, generator: torch.Generator | None = None, f_proj_init: str = "key") -> None:
        """Initialise what a conversion adds (the teacher's q/k/v/o are already in place):
        ``f_proj`` from the key projection pooled to M slots per kv head (the gate Liger derives
        from the keys, here as a trainable start) or random; identity feature maps; a unit output
        norm; window mix 0."""
        if self.f_proj is not None:
            w = self.f_proj.weight
            if f_proj_init == "key":
                k = self.k_proj.weight.float().view(self.num_kv_heads, self.head_dim, -1).transpose(1, 2)
                value = pool_heads(k, self.num_slots).transpose(1, 2).reshape(w.shape)
            else:
                value = torch.randn(w.shape, generator=generator) * self.config.initializer_range
            w.copy_(value.to(device=w.device, dtype=w.dtype))
        for fm in (self.q_map, self.k_map):
            if isinstance(fm, LearnableFeatureMap):
                fm.reset_parameters()
        if self.g_norm is not None:
            self.g_norm.weight.fill_(1.0)
        if self.window_mix is not None:
            self.window_mix.weight.zero_()

    # -- inputs ---------------------------------------------------------------------------------
    def gate_logits(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Slot-gate logits [B, T, H, M]: from ``f_proj``, or the keys k [B, T, H, D] pooled to M slots."""
        if self.f_proj is None:
            return pool_heads(k, self.num_slots)
        return self.f_proj(x).view(*x.shape[:2], self.num_kv_heads, self.num_slots)

    def gsa_inputs(self, x: torch.Tensor, ctx: AttentionContext):
        """(q, k, v, s, g) for the operator, plus the teacher's RoPE'd q and k and raw v (for the
        window): q [B, T, HQ, D], k and v [B, T, H, D], s and g [B, T, H, M]."""
        T = x.shape[1]
        q0, k0, v0 = self.project(x, ctx, rope=False)
        s, g = slot_gates(self.gate_logits(x, k0), self.tau)
        mask = ctx.token_mask(T)
        if mask is not None:  # padding must neither write nor decay the state
            keep = mask[:, :, None, None].to(s.dtype)
            s, g = s * keep, g * keep
        # the teacher's RoPE'd q and k: for the feature map (use_rope) and the window only; a layer
        # that uses neither skips the rotation (six elementwise kernels on q and k, per forward)
        needed = self.use_rope or self.window_size
        qr, kr = (apply_rotary(q0, ctx.cos, ctx.sin), apply_rotary(k0, ctx.cos, ctx.sin)) if needed else (None, None)
        q, k = (qr, kr) if self.use_rope else (q0, k0)
        dt = v0.dtype  # the compute dtype (autocast's, or the weights')
        q, k, v = self.q_map(q).to(dt), self.k_map(k).to(dt), self.v_activation(v0)
        return (q, k, v, s.to(dt), g.to(dt)), (qr, kr, v0)

    @torch.compiler.disable  # the kernels stay outside torch.compile's graphs (model.compile): a graph break
    def _gsa(self, q, k, v, s, g, ctx: AttentionContext, state, want_state: bool):
        B, T = q.shape[:2]
        if ctx.cu_seqlens is not None:  # packed documents: one long row, state reset per document
            q, k, v, s, g = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, s, g))
        op = fused_recurrent_gsa if (state is not None and T == 1) else chunk_gsa
        o, final = op(q, k, v, s, g, scale=self.scale, initial_state=state, output_final_state=want_state,
                      cu_seqlens=ctx.cu_seqlens, backend=self.backend)
        return o.reshape(B, T, self.num_heads, -1), final

    def _decode_step(self, x: torch.Tensor, ctx: AttentionContext, cache, state) -> torch.Tensor:
        """One new token per row on a cache that holds this layer's state: gates, elementwise feature
        maps, recurrence and output norm in one ``gsa_decode_step`` (one Triton kernel on CUDA, where
        the general path launches about 20 more small kernels a layer). A static cache's state is
        updated in place. Returns the normed output [B, 1, HQ, V], before ``o_proj``."""
        q, k, v = self.project(x, ctx, rope=False)
        logits = self.gate_logits(x, k)
        mask = ctx.token_mask(1)
        if mask is not None:  # a padding token neither writes nor decays the state: gate logit +inf
            logits = logits.masked_fill(~mask.bool()[:, :, None, None], float("inf"))
        if self.use_rope:
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        act = self.q_map.kind if isinstance(self.q_map, FixedFeatureMap) and self.q_map.kind in ACTIVATIONS \
            else "identity"
        if act == "identity":  # maps the kernel does not apply itself (softmax, the learnable ones)
            q, k = self.q_map(q).to(v.dtype), self.k_map(k).to(v.dtype)
        norm = self.g_norm
        o, final = gsa_decode_step(
            q, k, v, logits, state, tau=self.tau, scale=self.scale, qk_act=act, v_act=self.v_activation_name,
            norm_weight=None if norm is None else norm.weight, norm_eps=1e-6 if norm is None else norm.variance_epsilon,
            out_state=state if ctx.step else None, backend=self.backend)
        cache.set_gsa_state(self.layer_idx, final)
        return o

    # -- forwards -------------------------------------------------------------------------------
    def gsa_forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        state = cache.gsa_state(self.layer_idx) if cache is not None and T == 1 else None
        if state is not None and self.fused_decode and not self.window_size:
            return self.o_proj(self._decode_step(x, ctx, cache, state).reshape(B, T, -1))
        (q, k, v, s, g), teacher_qkv = self.gsa_inputs(x, ctx)
        if self.window_size:
            o = self._windowed(q, k, v, s, g, teacher_qkv, ctx, cache)
        else:
            state = cache.gsa_state(self.layer_idx) if cache is not None else None
            o, final = self._gsa(q, k, v, s, g, ctx, state, cache is not None)
            if cache is not None:
                cache.set_gsa_state(self.layer_idx, final)
        if self.g_norm is not None:
            o = self.g_norm(self.norm_activation(o))
        return self.o_proj(o.reshape(B, T, -1))

    def _windowed(self, q, k, v, s, g, teacher_qkv, ctx: AttentionContext, cache) -> torch.Tensor:
        """Window softmax over the last W tokens + GSA over the older ones, mixed (module doc)."""
        W, (qr, kr, v0) = self.window_size, teacher_qkv
        if ctx.step:
            return self._window_step(q, k, v, s, g, teacher_qkv, ctx, cache)
        B, T = q.shape[:2]
        mask = ctx.token_mask(T)
        pos = ctx.positions if ctx.positions is not None else torch.arange(T, device=q.device).expand(B, T)
        if cache is None:
            o_w, lse = window_attention(qr, kr, v0, W, self.head_dim ** -0.5, key_valid=mask, doc_ids=ctx.doc_ids)
            # GSA over tokens older than the window: the query at t reads the state after t - W.
            fresh = (pos >= W)[:, :, None, None].to(s.dtype)  # t - W lies in the same document
            k_old, v_old = _shift_right(k, W), _shift_right(v, W)
            s_old, g_old = _shift_right(s, W) * fresh, _shift_right(g, W) * fresh
            o_g, _ = self._gsa(q, k_old, v_old, s_old, g_old, ctx, None, False) if T > W else (None, None)
        else:
            buf = cache.window_buffer(self.layer_idx)
            if buf is None:  # W empty (invalid) entries: they neither attend nor write
                buf = {"k": kr.new_zeros(B, W, *kr.shape[2:]), "v": v0.new_zeros(B, W, *v0.shape[2:]),
                       "gk": k.new_zeros(B, W, *k.shape[2:]), "gv": v.new_zeros(B, W, *v.shape[2:]),
                       "s": s.new_zeros(B, W, *s.shape[2:]), "g": g.new_zeros(B, W, *g.shape[2:]),
                       "valid": torch.zeros(B, W, dtype=torch.bool, device=q.device)}
            new = {"k": kr, "v": v0, "gk": k, "gv": v, "s": s, "g": g,
                   "valid": mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)}
            full = {name: torch.cat([buf[name], new[name].to(buf[name].dtype)], 1) for name in buf}
            o_w, lse = window_attention(qr, full["k"], full["v"], W, self.head_dim ** -0.5, key_valid=full["valid"])
            # the T oldest entries of buffer + new tokens leave the window and enter the state
            state = cache.gsa_state(self.layer_idx)
            old = [full[n][:, :T] for n in ("gk", "gv", "s", "g")]
            o_g, final = self._gsa(q, *old, ctx, state, True)
            cache.set_gsa_state(self.layer_idx, final)
            cache.set_window_buffer(self.layer_idx, {n: t[:, T:] for n, t in full.items()})
        return self._mix(o_w, lse, o_g, pos)

    def _window_step(self, q, k, v, s, g, teacher_qkv, ctx: AttentionContext, cache) -> torch.Tensor:
        """``_windowed`` for one decoding step on a static cache: the token of column c takes slot
        c mod W of the ring buffer, whose previous entry (c - W) enters the GSA state."""
        qr, kr, v0 = teacher_qkv
        ring, slot = cache.ring(self.layer_idx), cache.step_index % self.window_size
        old = [ring[n].index_select(1, slot) for n in ("gk", "gv", "s", "g")]
        for n, t in (("k", kr), ("v", v0), ("gk", k), ("gv", v), ("s", s), ("g", g)):
            ring[n].index_copy_(1, slot, t.to(ring[n].dtype))
        ring["valid"].index_fill_(1, slot, True)
        o_w, lse = ring_window_attention(qr, ring["k"], ring["v"], ring["valid"], self.head_dim ** -0.5)
        o_g, final = self._gsa(q, *old, ctx, cache.gsa_state(self.layer_idx), True)
        cache.set_gsa_state(self.layer_idx, final)
        return self._mix(o_w, lse, o_g, ctx.positions)

    def _mix(self, o_w, lse, o_g, pos) -> torch.Tensor:
        """The window's and the state's outputs weighed as one softmax would (module doc)."""
        if o_g is None or not self.branches["gsa"]:
            return o_w
        if not self.branches["window"]:
            return o_g
        W = self.window_size
        n_old = (pos - W + 1).clamp_min(0).float()[:, :, None]  # [B, T, 1]
        log_old = self.window_mix.weight.float() + n_old.log()  # -inf where nothing is older than the window
        w = torch.sigmoid(lse - log_old)[..., None]
        return (w * o_w.float() + (1 - w) * o_g.float()).to(o_w.dtype)

    def transfer_forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Attention transfer: return the teacher's output (so the next layer sees the teacher's
        hidden states) and add this layer's per-token squared error [B, T] to ``ctx.transfer``."""
        with torch.no_grad():
            teacher = self.softmax_forward(x, ctx)
        student = self.gsa_forward(x.detach(), ctx)
        ctx.transfer.add(self.layer_idx, (student.float() - teacher.float()).pow(2).mean(-1))
        return teacher

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache=None) -> torch.Tensor:
        if self.as_teacher:
            return self.softmax_forward(x, ctx, cache)
        if ctx.transfer is not None:
            return self.transfer_forward(x, ctx)
        return self.gsa_forward(x, ctx, cache)
