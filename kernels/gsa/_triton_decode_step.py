"""The fused GSA decoding step on Triton: gates, feature maps, recurrence and output norm in one kernel.

One program per (sequence, kv head), all of the value dim: it loads the kv head's fp32 state, and
for each new token turns the raw gate logits into the forget gate and write weight
(``g = logsigmoid(x) / tau``, ``s = 1 - exp(g)``), applies the elementwise feature map to q and k
and the activation to v, updates the state and serves the G query heads of the group, then (with
a norm weight) ``RMSNorm(silu(o))`` over the value dim. The state is written back to ``htk`` /
``htv``, which may be the initial state's own buffers: each program reads its whole state before
it writes. Without this kernel a decoding step runs about 20 small kernels a layer around the
recurrence (gate math, casts, feature maps, norm, state copies); see ``decode_step.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_intra import load_state, vmax, vsum

# constexpr codes of the elementwise maps the kernel applies (decode_step.ACTIVATIONS names them)
IDENTITY, SILU, RELU, ELU1 = 0, 1, 2, 3


@triton.jit
def _act(x, KIND: tl.constexpr):
    if KIND == 1:
        return x / (1. + tl.exp(-x))
    if KIND == 2:
        return tl.maximum(x, 0.)
    if KIND == 3:
        return tl.where(x > 0, x + 1., tl.exp(tl.minimum(x, 0.)))
    return x


@triton.jit
def _gates(x, tau):
    """(g, s) from gate logits x (fp32): g = logsigmoid(x) / tau, s = -expm1(g), both accurate for
    logits far above 0 (where g and s are tiny); x = +inf gives g = s = 0 (a token that is skipped)."""
    u = tl.exp(-tl.abs(x))
    log1p_u = tl.where(u < 1e-4, u * (1. - 0.5 * u), tl.log(1. + u))
    g = (tl.minimum(x, 0.) - log1p_u) / tau
    s = tl.where(g > -1e-3, -g * (1. + g * (0.5 + g / 6.)), 1. - tl.exp(g))
    return g, s


@triton.jit
def _decode_step_kernel(q, k, v, x, h0k, h0v, htk, htv, o, w, T, scale, tau, eps, H: tl.constexpr,
                        G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, BM: tl.constexpr, QK_ACT: tl.constexpr, V_ACT: tl.constexpr,
                        NORM: tl.constexpr, USE_H0: tl.constexpr):
    nh = tl.program_id(0)
    n, h = nh // H, nh % H
    bos = n.to(tl.int64) * T
    HQ: tl.constexpr = H * G
    o_k, o_v, o_m = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    hk, hv, st_k, st_v, m_km, m_mv = load_state(h0k, h0v, nh, o_k, o_v, o_m, m_k, m_v, m_m, K, V, M, BK, BV, BM,
                                                USE_H0)
    if NORM:
        wv = tl.load(w + o_v, mask=m_v, other=0.).to(tl.float32)
    for t in range(bos, bos + T):
        # masked lanes stay 0 after the map (elu1 maps 0 to 1)
        kt = tl.where(m_k, _act(tl.load(k + (t * H + h) * K + o_k, mask=m_k, other=0.).to(tl.float32), QK_ACT), 0.)
        vt = tl.where(m_v, _act(tl.load(v + (t * H + h) * V + o_v, mask=m_v, other=0.).to(tl.float32), V_ACT), 0.)
        xt = tl.load(x + (t * H + h) * M + o_m, mask=m_m, other=0.).to(tl.float32)
        gt, st = _gates(xt, tau)
        st = tl.where(m_m, st, 0.)
        alpha = tl.exp(gt)
        hk = hk * alpha[None, :] + kt[:, None] * st[None, :]
        hv = hv * alpha[:, None] + st[:, None] * vt[None, :]
        for i in range(G):
            hq = h * G + i
            qt = tl.where(m_k, _act(tl.load(q + (t * HQ + hq) * K + o_k, mask=m_k, other=0.).to(tl.float32),
                                    QK_ACT), 0.)
            z = tl.where(m_m, vsum(qt[:, None] * hk, 0) * scale, float("-inf"))
            e = tl.exp(z - vmax(z, 0))
            ot = vsum((e / vsum(e, 0))[:, None] * hv, 0)
            if NORM:
                a = tl.where(m_v, ot / (1. + tl.exp(-ot)), 0.)
                ot = a / tl.sqrt(vsum(a * a, 0) / V + eps) * wv
            tl.store(o + (t * HQ + hq) * V + o_v, ot.to(o.dtype.element_ty), mask=m_v)
    tl.store(htk + st_k, hk, mask=m_km)
    tl.store(htv + st_v, hv, mask=m_mv)
