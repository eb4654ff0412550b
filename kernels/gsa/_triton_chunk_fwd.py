"""Chunked GSA forward output kernel: pass 1, softmax and pass 2 fused, one program per
(chunk, kv head) serving all G query heads of the group.

Per query head, with the states (Hk, Hv) entering the chunk and b = cumsum(g) in the chunk:

    Y = exp(b) * (q Hk) + op1(q k^T, s) + diag(q k^T) s     slot logits before scale
    p = softmax(scale * Y)                         over the M slots, fp32
    o = (p * exp(b)) Hv + op2(p, s) v

k, v, s, the gates, both states and the decayed slot weights are loaded and computed once per
program and shared by the G query heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_intra import FACTORED, THRESH, chunk_gates, diag, masked_softmax, op1, op2
from ._triton_launch import launch


@triton.jit
def chunk_logits(q_t, k_t, hk, s_t, sn, b, eb, regime, scale, m_m, C: tl.constexpr, DT: tl.constexpr,
                 PREC: tl.constexpr):
    """One query head's slot logits without their diagonal (i = t) terms, y_off [C, BM] (unscaled),
    the full logits' softmax p, and A = q k^T (q_t, k_t in DT)."""
    a = tl.dot(q_t, tl.trans(k_t), input_precision=PREC)
    y_off = eb * tl.dot(q_t, hk, input_precision=PREC) + op1(a, s_t, sn, b, eb, regime, C, DT, PREC)
    p = masked_softmax((y_off + diag(a, C)[:, None] * s_t) * scale, m_m)
    return y_off, p, a


@triton.jit
def _fwd_o_kernel(q, k, v, s, g, snap_k, snap_v, o, chunks, scale, H: tl.constexpr, G: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                  THR: tl.constexpr, SPEC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
    o_t = tl.arange(0, C)
    o_k, o_v, o_m = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BM)
    m_t, m_k, m_v, m_m = o_t < length, o_k < K, o_v < V, o_m < M
    rows = tok0 + o_t
    k_t = tl.load(k + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                  other=0.).to(DT)
    v_t = tl.load(v + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.).to(DT)
    s_t = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :],
                  other=0.).to(tl.float32)
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    hk = tl.load(snap_k + (sidx * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :],
                 mask=m_k[:, None] & m_m[None, :], other=0.).to(DT)
    hv = tl.load(snap_v + (sidx * H + h) * (M * V) + o_m[:, None] * V + o_v[None, :],
                 mask=m_m[:, None] & m_v[None, :], other=0.).to(DT)
    if SPEC:  # a copy of the loop for factored chunks (only their gate tiles live), one for the rest
        if regime == FACTORED:
            _fwd_o_heads(q, o, k_t, v_t, hk, hv, s_t, sn, b, eb, FACTORED, scale, rows, h, o_k, o_v, m_t, m_k, m_v, m_m,
                         H, G, K, V, C, DT, PREC)
        else:
            _fwd_o_heads(q, o, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v, m_t, m_k, m_v, m_m,
                         H, G, K, V, C, DT, PREC)
    else:
        _fwd_o_heads(q, o, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v, m_t, m_k, m_v, m_m,
                     H, G, K, V, C, DT, PREC)


@triton.jit
def _fwd_o_heads(q, o, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v, m_t, m_k, m_v, m_m,
                 H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 DT: tl.constexpr, PREC: tl.constexpr):
    HQ: tl.constexpr = H * G
    for i in range(G):
        hq = h * G + i
        q_t = tl.load(q + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.).to(DT)
        y_off, p, a = chunk_logits(q_t, k_t, hk, s_t, sn, b, eb, regime, scale, m_m, C, DT, PREC)
        a2 = op2(p, s_t, sn, b, eb, regime, C, DT, PREC)
        out = tl.dot((p * eb).to(DT), hv, input_precision=PREC) + tl.dot(a2.to(DT), v_t, input_precision=PREC)
        tl.store(o + rows[:, None] * (HQ * V) + hq * V + o_v[None, :], out.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])


def forward_output(p, snap_k, snap_v, tables, num_warps=8, num_stages=2, spec=False):
    """o [B, T, HQ, V] in the input dtype, from the state snapshots entering every chunk."""
    d = p.dims
    o = torch.empty(d.B, d.T, d.HQ, d.V, device=p.q.device, dtype=p.q.dtype)
    if tables.n_chunks:
        launch(_fwd_o_kernel, (tables.n_chunks, d.H),
            q=p.q, k=p.k, v=p.v, s=p.s, g=p.g, snap_k=snap_k, snap_v=snap_v, o=o, chunks=tables.chunks,
            scale=p.scale, H=d.H, G=d.G, K=d.K, V=d.V, M=d.M, C=tables.C, BK=p.BK, BV=p.BV, BM=p.BM, DT=p.DT,
            PREC=p.PREC, THR=THRESH, SPEC=spec, num_warps=num_warps, num_stages=num_stages)
    return o
