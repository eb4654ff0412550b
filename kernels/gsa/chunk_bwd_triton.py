"""Chunked GSA backward kernels (one program per (chunk, kv head), all G query heads inside).

Notation per query head: Y = unscaled slot logits, Z = scale * Y, p = softmax(Z), dY = scale * dZ,
A = q k^T, Bm = dO v^T; op1/op1t leave out the diagonal i = t, written "+ diag" below.
With dp_t = Hv_t dO_t (Hv_t the slot values after token t),

    dp = exp(b) * (dO Hv^T) + op1(Bm, s) + diag       dZ = p * (dp - sum_m p dp)
    dq = (dY exp(b)) Hk^T + op2(dY, s) k               dk = sum_heads op2(dY, s)^T q + w dSk^T
    dv = sum_heads op2(p, s)^T dO + w dSv               w = s exp(b_end - b)
    ds = sum_heads [op1t(A, dY) + op1t(Bm, p) + diag] + exp(b_end - b) (k dSk + v dSv^T)
    dg_j = sum_{t>=j} (R - s ds_off)_t + sum_{i<j} (w (k dSk + v dSv^T))_i + exp(b_end) <dS, H>

where R = sum_heads (Z_off dZ + p dp_off) and ds_off are the sums without the diagonal terms, dS
are the gradients of the states leaving the chunk and H the states entering it. Every term that
cancels exactly between the query side and the key side of a decay (the diagonal i = t, and a
token's own write into the state leaving the chunk) is left out rather than subtracted, so dg
keeps its relative accuracy when the forget gates are near 0 and dg is tiny. Kernels: `prep`
(p, dY, R), the state-gradient scan (chunk_state_triton), `qk` (dq, dk, the q/k part of ds, and
of dg written over R) and `vg` (dv, ds, dg).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_fwd_triton import chunk_logits
from .chunk_intra_triton import THRESH, chunk_gates, diag, exclusive_cumsum, op1, op1t, op2, vcumsum, vsum


@triton.jit
def _bwd_prep_kernel(q, k, v, s, g, snap_k, snap_v, do, prob, dy, r, chunks, scale, H: tl.constexpr,
                     G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, THR: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
    HQ: tl.constexpr = H * G
    o_t = tl.arange(0, C)
    o_k, o_v, o_m = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BM)
    m_t, m_k, m_v, m_m = o_t < length, o_k < K, o_v < V, o_m < M
    m_tm = m_t[:, None] & m_m[None, :]
    rows = tok0 + o_t
    k_t = tl.load(k + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                  other=0.).to(DT)
    v_t = tl.load(v + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.).to(DT)
    s_t = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
    b, b_end, eb, enb, safe = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    hk = tl.load(snap_k + (sidx * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :],
                 mask=m_k[:, None] & m_m[None, :], other=0.).to(DT)
    hv = tl.load(snap_v + (sidx * H + h) * (M * V) + o_m[:, None] * V + o_v[None, :],
                 mask=m_m[:, None] & m_v[None, :], other=0.).to(DT)
    racc = tl.full([C, BM], 0., tl.float32)
    for i in range(G):
        hq = h * G + i
        q_t = tl.load(q + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.).to(DT)
        do_t = tl.load(do + rows[:, None] * (HQ * V) + hq * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.).to(DT)
        y_off, p, a = chunk_logits(q_t, k_t, hk, s_t, sn, b, eb, safe, scale, m_m, C, DT, PREC)
        bm = tl.dot(do_t, tl.trans(v_t), input_precision=PREC)
        dp_off = eb * tl.dot(do_t, tl.trans(hv), input_precision=PREC) + op1(bm, s_t, sn, b, eb, safe, C, DT, PREC)
        dp = dp_off + diag(bm, C)[:, None] * s_t
        dz = p * (dp - vsum(p * dp, 1)[:, None])
        racc += (y_off * scale) * dz + p * dp_off
        off = rows[:, None] * (HQ * M) + hq * M + o_m[None, :]
        tl.store(prob + off, p.to(prob.dtype.element_ty), mask=m_tm)
        tl.store(dy + off, (dz * scale).to(dy.dtype.element_ty), mask=m_tm)
    tl.store(r + rows[:, None] * (H * M) + h * M + o_m[None, :], racc, mask=m_tm)


@triton.jit
def _bwd_qk_kernel(q, k, s, g, snap_k, ds_k, dy, r, dq, dk, dsa, chunks, H: tl.constexpr, G: tl.constexpr,
                   K: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                   DT: tl.constexpr, PREC: tl.constexpr, THR: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
    HQ: tl.constexpr = H * G
    o_t = tl.arange(0, C)
    o_k, o_m = tl.arange(0, BK), tl.arange(0, BM)
    m_t, m_k, m_m = o_t < length, o_k < K, o_m < M
    m_tk, m_tm, m_km = m_t[:, None] & m_k[None, :], m_t[:, None] & m_m[None, :], m_k[:, None] & m_m[None, :]
    rows = tok0 + o_t
    k_t = tl.load(k + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
    s_t = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
    b, b_end, eb, enb, safe = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    st = (sidx * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :]
    hk = tl.load(snap_k + st, mask=m_km, other=0.)
    dsk = tl.load(ds_k + st, mask=m_km, other=0.)
    hk_d, dsk_d = hk.to(DT), dsk.to(DT)
    dk_acc = tl.full([C, BK], 0., tl.float32)
    ds_acc = tl.full([C, BM], 0., tl.float32)  # without the diagonal terms
    ds_dia = tl.full([C, BM], 0., tl.float32)
    for i in range(G):
        hq = h * G + i
        q_t = tl.load(q + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
        dy_t = tl.load(dy + rows[:, None] * (HQ * M) + hq * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
        a = tl.dot(q_t, tl.trans(k_t), input_precision=PREC)
        a3 = op2(dy_t, s_t, sn, b, eb, safe, C, DT, PREC)
        dq_t = tl.dot((dy_t * eb).to(DT), tl.trans(hk_d), input_precision=PREC)
        dq_t += tl.dot(a3.to(DT), k_t, input_precision=PREC)
        tl.store(dq + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], dq_t.to(dq.dtype.element_ty), mask=m_tk)
        dk_acc += tl.dot(tl.trans(a3).to(DT), q_t, input_precision=PREC)
        ds_acc += op1t(a, dy_t, b, eb, enb, safe, C, DT, PREC)
        ds_dia += diag(a, C)[:, None] * dy_t
    to_end = tl.exp(b_end[None, :] - b)
    w = s_t * to_end
    dk_acc += tl.dot(w.to(DT), tl.trans(dsk_d), input_precision=PREC)
    kd = tl.dot(k_t, dsk_d, input_precision=PREC)
    wkd = w * kd
    carry = tl.exp(b_end) * vsum(dsk.to(tl.float32) * hk.to(tl.float32), 0)
    tl.store(dk + rows[:, None] * (H * K) + h * K + o_k[None, :], dk_acc.to(dk.dtype.element_ty), mask=m_tk)
    off = rows[:, None] * (H * M) + h * M + o_m[None, :]
    tl.store(dsa + off, ds_acc + ds_dia + to_end * kd, mask=m_tm)
    db = tl.load(r + off, mask=m_tm, other=0.) - s_t * ds_acc
    dg_t = vcumsum(db, True) + exclusive_cumsum(wkd) + carry[None, :]
    tl.store(r + off, dg_t, mask=m_tm)


@triton.jit
def _bwd_vg_kernel(v, s, g, snap_v, ds_v, do, prob, r, dsa, dv, ds, dg, chunks, H: tl.constexpr,
                   G: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                   BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, THR: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
    HQ: tl.constexpr = H * G
    o_t = tl.arange(0, C)
    o_v, o_m = tl.arange(0, BV), tl.arange(0, BM)
    m_t, m_v, m_m = o_t < length, o_v < V, o_m < M
    m_tv, m_tm, m_mv = m_t[:, None] & m_v[None, :], m_t[:, None] & m_m[None, :], m_m[:, None] & m_v[None, :]
    rows = tok0 + o_t
    v_t = tl.load(v + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_tv, other=0.).to(DT)
    s_t = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
    b, b_end, eb, enb, safe = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    st = (sidx * H + h) * (M * V) + o_m[:, None] * V + o_v[None, :]
    hv = tl.load(snap_v + st, mask=m_mv, other=0.)
    dsv = tl.load(ds_v + st, mask=m_mv, other=0.)
    dsv_d = dsv.to(DT)
    dv_acc = tl.full([C, BV], 0., tl.float32)
    ds_acc = tl.full([C, BM], 0., tl.float32)  # without the diagonal terms
    ds_dia = tl.full([C, BM], 0., tl.float32)
    for i in range(G):
        hq = h * G + i
        do_t = tl.load(do + rows[:, None] * (HQ * V) + hq * V + o_v[None, :], mask=m_tv, other=0.).to(DT)
        p = tl.load(prob + rows[:, None] * (HQ * M) + hq * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
        bm = tl.dot(do_t, tl.trans(v_t), input_precision=PREC)
        a2 = op2(p, s_t, sn, b, eb, safe, C, DT, PREC)
        dv_acc += tl.dot(tl.trans(a2).to(DT), do_t, input_precision=PREC)
        ds_acc += op1t(bm, p, b, eb, enb, safe, C, DT, PREC)
        ds_dia += diag(bm, C)[:, None] * p
    to_end = tl.exp(b_end[None, :] - b)
    w = s_t * to_end
    dv_acc += tl.dot(w.to(DT), dsv_d, input_precision=PREC)
    vd = tl.dot(v_t, tl.trans(dsv_d), input_precision=PREC)
    wvd = w * vd
    carry = tl.exp(b_end) * vsum(dsv.to(tl.float32) * hv.to(tl.float32), 1)
    off = rows[:, None] * (H * M) + h * M + o_m[None, :]
    dg_t = vcumsum(-s_t * ds_acc, True) + exclusive_cumsum(wvd) + carry[None, :]
    dg_t += tl.load(r + off, mask=m_tm, other=0.)
    ds_acc += ds_dia + to_end * vd + tl.load(dsa + off, mask=m_tm, other=0.)
    tl.store(dv + rows[:, None] * (H * V) + h * V + o_v[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_tv)
    tl.store(ds + off, ds_acc.to(ds.dtype.element_ty), mask=m_tm)
    tl.store(dg + off, dg_t.to(dg.dtype.element_ty), mask=m_tm)


def backward_prep(p, do, snap_k, snap_v, chunks, n_chunks, C, num_warps=8, num_stages=2):
    """p (slot probabilities), dY = scale * dZ (both [B, T, HQ, M]) and R [B, T, H, M] (fp32)."""
    d = p.dims
    dev = p.q.device
    prob = torch.empty(d.B, d.T, d.HQ, d.M, device=dev, dtype=p.act_dtype)
    dy = torch.empty_like(prob)
    r = torch.empty(d.B, d.T, d.H, d.M, device=dev, dtype=torch.float32)
    if n_chunks:
        _bwd_prep_kernel[(n_chunks, d.H)](
            p.q, p.k, p.v, p.s, p.g, snap_k, snap_v, do, prob, dy, r, chunks, p.scale, H=d.H, G=d.G, K=d.K,
            V=d.V, M=d.M, C=C, BK=p.BK, BV=p.BV, BM=p.BM, DT=p.DT, PREC=p.PREC, THR=THRESH,
            num_warps=num_warps, num_stages=num_stages)
    return prob, dy, r


def backward_inputs(p, do, prob, dy, r, snap_k, snap_v, ds_k, ds_v, chunks, n_chunks, C, num_warps=8,
                    num_stages=2):
    """dq, dk, dv, ds, dg in the input dtype."""
    d = p.dims
    dev = p.q.device
    dq, dk, dv = torch.empty_like(p.q), torch.empty_like(p.k), torch.empty_like(p.v)
    ds, dg = torch.empty_like(p.s), torch.empty_like(p.g)
    if n_chunks:
        dsa = torch.empty(d.B, d.T, d.H, d.M, device=dev, dtype=torch.float32)
        _bwd_qk_kernel[(n_chunks, d.H)](
            p.q, p.k, p.s, p.g, snap_k, ds_k, dy, r, dq, dk, dsa, chunks, H=d.H, G=d.G, K=d.K, M=d.M, C=C,
            BK=p.BK, BM=p.BM, DT=p.DT, PREC=p.PREC, THR=THRESH, num_warps=num_warps, num_stages=num_stages)
        _bwd_vg_kernel[(n_chunks, d.H)](
            p.v, p.s, p.g, snap_v, ds_v, do, prob, r, dsa, dv, ds, dg, chunks, H=d.H, G=d.G, V=d.V, M=d.M,
            C=C, BV=p.BV, BM=p.BM, DT=p.DT, PREC=p.PREC, THR=THRESH, num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv, ds, dg
