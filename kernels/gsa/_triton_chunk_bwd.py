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
(p, dY, R), the state-gradient contributions with the intra-chunk ds parts and their scan
(_triton_chunk_state), `dqkv` (dq, dk per key tile, dv per value tile, with partial sums for ds
and dg) and `finish` (ds, dg).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_chunk_fwd import chunk_logits
from ._triton_intra import FACTORED, THRESH, chunk_gates, diag, exclusive_cumsum, op1, op2, vcumsum, vsum
from ._triton_launch import launch


@triton.jit
def _bwd_prep_kernel(q, k, v, s, g, snap_k, snap_v, do, prob, dy, r, chunks, scale, H: tl.constexpr,
                     G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, THR: tl.constexpr, SPEC: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
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
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    hk = tl.load(snap_k + (sidx * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :],
                 mask=m_k[:, None] & m_m[None, :], other=0.).to(DT)
    hv = tl.load(snap_v + (sidx * H + h) * (M * V) + o_m[:, None] * V + o_v[None, :],
                 mask=m_m[:, None] & m_v[None, :], other=0.).to(DT)
    if SPEC:  # a copy of the loop for factored chunks (only their gate tiles live), one for the rest
        if regime == FACTORED:
            racc = _prep_heads(q, do, prob, dy, k_t, v_t, hk, hv, s_t, sn, b, eb, FACTORED, scale, rows, h, o_k, o_v,
                               o_m, m_t, m_k, m_v, m_m, H, G, K, V, M, C, BM, DT, PREC)
        else:
            racc = _prep_heads(q, do, prob, dy, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v,
                               o_m, m_t, m_k, m_v, m_m, H, G, K, V, M, C, BM, DT, PREC)
    else:
        racc = _prep_heads(q, do, prob, dy, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v, o_m,
                           m_t, m_k, m_v, m_m, H, G, K, V, M, C, BM, DT, PREC)
    tl.store(r + rows[:, None] * (H * M) + h * M + o_m[None, :], racc, mask=m_tm)


@triton.jit
def _prep_heads(q, do, prob, dy, k_t, v_t, hk, hv, s_t, sn, b, eb, regime, scale, rows, h, o_k, o_v, o_m, m_t, m_k,
                m_v, m_m, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                C: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    HQ: tl.constexpr = H * G
    m_tm = m_t[:, None] & m_m[None, :]
    racc = tl.full([C, BM], 0., tl.float32)
    for i in range(G):
        hq = h * G + i
        q_t = tl.load(q + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.).to(DT)
        do_t = tl.load(do + rows[:, None] * (HQ * V) + hq * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.).to(DT)
        y_off, p, a = chunk_logits(q_t, k_t, hk, s_t, sn, b, eb, regime, scale, m_m, C, DT, PREC)
        bm = tl.dot(do_t, tl.trans(v_t), input_precision=PREC)
        dp_off = eb * tl.dot(do_t, tl.trans(hv), input_precision=PREC) + op1(bm, s_t, sn, b, eb, regime, C, DT, PREC)
        dp = dp_off + diag(bm, C)[:, None] * s_t
        dz = p * (dp - vsum(p * dp, 1)[:, None])
        racc += (y_off * scale) * dz + p * dp_off
        off = rows[:, None] * (HQ * M) + hq * M + o_m[None, :]
        tl.store(prob + off, p.to(prob.dtype.element_ty), mask=m_tm)
        tl.store(dy + off, (dz * scale).to(dy.dtype.element_ty), mask=m_tm)
    return racc


def backward_prep(p, do, snap_k, snap_v, tables, num_warps=8, num_stages=2, spec=False):
    """p (slot probabilities), dY = scale * dZ (both [B, T, HQ, M]) and R [B, T, H, M] (fp32)."""
    d = p.dims
    dev = p.q.device
    prob = torch.empty(d.B, d.T, d.HQ, d.M, device=dev, dtype=p.prob_dtype)
    dy = torch.empty(d.B, d.T, d.HQ, d.M, device=dev, dtype=p.act_dtype)
    r = torch.empty(d.B, d.T, d.H, d.M, device=dev, dtype=torch.float32)
    if tables.n_chunks:
        launch(_bwd_prep_kernel, (tables.n_chunks, d.H),
            q=p.q, k=p.k, v=p.v, s=p.s, g=p.g, snap_k=snap_k, snap_v=snap_v, do=do, prob=prob, dy=dy, r=r,
            chunks=tables.chunks, scale=p.scale, H=d.H, G=d.G, K=d.K, V=d.V, M=d.M, C=tables.C, BK=p.BK, BV=p.BV,
            BM=p.BM, DT=p.DT, PREC=p.PREC, THR=THRESH, SPEC=spec, num_warps=num_warps, num_stages=num_stages)
    return prob, dy, r


# --------------------------------------------------------------- split input-gradient kernels
#
# With the intra-chunk ds parts (from the state-gradient contribution kernel) and R, what is left per chunk
# splits over tiles of the key dim (dq, dk) and of the value dim (dv) with no full-width product:
#
#   key tile kt    dq[:, kt] = (dY exp(b)) Hk[kt]^T + op2(dY, s) k[:, kt]  (each query head)
#                  dk[:, kt] = sum_heads op2(dY, s)^T q[:, kt] + w dSk[kt]^T
#                  partials  k[:, kt] dSk[kt]  and  sum_rows(dSk[kt] * Hk[kt])
#   value tile vt  dv[:, vt] = sum_heads op2(p, s)^T dO[:, vt] + w dSv[:, vt]
#                  partials  v[:, vt] dSv[:, vt]^T  and  sum_cols(dSv[:, vt] * Hv[:, vt])
#
# and a last small kernel adds the tiles' partials into ds and dg:
#
#   ds = dsi + exp(b_end - b) (k dSk + v dSv^T)
#   dg = revcumsum(R - s ds_off) + exclusive_cumsum(w (k dSk + v dSv^T)) + exp(b_end) <dS, H>
#
# Fewer live tiles per program (no [C, K] gradient next to a [C, M] one, no full-width state) and
# more programs than two fused full-width kernels (the first version, 1.85-2.7x slower overall).


@triton.jit
def _dq_dk_loop(q, dy, dq, acc, k_t, hk_d, s_t, sn, b, eb, regime, rows, o_k, o_m, m_tk, m_tm, h, H: tl.constexpr,
                G: tl.constexpr, K: tl.constexpr, M: tl.constexpr, C: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr):
    HQ: tl.constexpr = H * G
    for i in range(G):
        hq = h * G + i
        q_t = tl.load(q + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
        dy_t = tl.load(dy + rows[:, None] * (HQ * M) + hq * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
        a3 = op2(dy_t, s_t, sn, b, eb, regime, C, DT, PREC)
        dq_t = tl.dot((dy_t * eb).to(DT), tl.trans(hk_d), input_precision=PREC)
        dq_t += tl.dot(a3.to(DT), k_t, input_precision=PREC)
        tl.store(dq + rows[:, None] * (HQ * K) + hq * K + o_k[None, :], dq_t.to(dq.dtype.element_ty), mask=m_tk)
        acc += tl.dot(tl.trans(a3).to(DT), q_t, input_precision=PREC)
    return acc


@triton.jit
def _dv_loop(do, prob, acc, s_t, sn, b, eb, regime, rows, o_v, o_m, m_tv, m_tm, h, H: tl.constexpr, G: tl.constexpr,
             V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    HQ: tl.constexpr = H * G
    for i in range(G):
        hq = h * G + i
        do_t = tl.load(do + rows[:, None] * (HQ * V) + hq * V + o_v[None, :], mask=m_tv, other=0.).to(DT)
        p_t = tl.load(prob + rows[:, None] * (HQ * M) + hq * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
        a2 = op2(p_t, s_t, sn, b, eb, regime, C, DT, PREC)
        acc += tl.dot(tl.trans(a2).to(DT), do_t, input_precision=PREC)
    return acc


@triton.jit
def _bwd_dqkv_kernel(q, k, v, s, g, snap_k, snap_v, ds_k, ds_v, dy, do, prob, dq, dk, dv, part, carry, chunks,
                     n_chunks, n_rows, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
                     NKT: tl.constexpr, SPEC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                     THR: tl.constexpr):
    """Programs pt < NKT: dq and dk on key tile pt; the others dv on value tile pt - NKT. Each also
    writes its tile's share of k dSk (v dSv^T) and of <dS, H> for the last kernel. SPEC: compile
    the loop over query heads once for factored chunks, so that it keeps only the gate tiles it needs
    live, and once for the others (blocked or pairwise)."""
    NT: tl.constexpr = NKT + (V + BV - 1) // BV
    # grid (NT * chunks, H): the tiles of one chunk are neighbours (they share dY, p, s, g in L2)
    c, pt, h = tl.program_id(0) // NT, tl.program_id(0) % NT, tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    sidx = tl.load(chunks + c * 3 + 2).to(tl.int64)
    o_t, o_m = tl.arange(0, C), tl.arange(0, BM)
    m_t, m_m = o_t < length, o_m < M
    m_tm = m_t[:, None] & m_m[None, :]
    rows = tok0 + o_t
    s_t = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sn = (s_t * enb).to(DT)
    w = (s_t * tl.exp(b_end[None, :] - b)).to(DT)
    poff = (pt * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :]
    coff = (pt * n_chunks + c) * (H * M) + h * M + o_m
    if pt < NKT:
        o_k = pt * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk, m_km = m_t[:, None] & m_k[None, :], m_k[:, None] & m_m[None, :]
        k_t = tl.load(k + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_tk, other=0.).to(DT)
        stk = (sidx * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :]
        hk = tl.load(snap_k + stk, mask=m_km, other=0.).to(tl.float32)
        dsk = tl.load(ds_k + stk, mask=m_km, other=0.).to(tl.float32)
        tl.store(carry + coff, vsum(dsk * hk, 0), mask=m_m)
        hk_d, dsk_d = hk.to(DT), dsk.to(DT)
        tl.store(part + poff, tl.dot(k_t, dsk_d, input_precision=PREC), mask=m_tm)
        dk_acc = tl.dot(w, tl.trans(dsk_d), input_precision=PREC)
        if SPEC:
            if regime == FACTORED:
                dk_acc = _dq_dk_loop(q, dy, dq, dk_acc, k_t, hk_d, s_t, sn, b, eb, FACTORED, rows, o_k, o_m, m_tk, m_tm,
                                     h, H, G, K, M, C, DT, PREC)
            else:
                dk_acc = _dq_dk_loop(q, dy, dq, dk_acc, k_t, hk_d, s_t, sn, b, eb, regime, rows, o_k, o_m, m_tk,
                                     m_tm, h, H, G, K, M, C, DT, PREC)
        else:
            dk_acc = _dq_dk_loop(q, dy, dq, dk_acc, k_t, hk_d, s_t, sn, b, eb, regime, rows, o_k, o_m, m_tk, m_tm, h,
                                 H, G, K, M, C, DT, PREC)
        tl.store(dk + rows[:, None] * (H * K) + h * K + o_k[None, :], dk_acc.to(dk.dtype.element_ty), mask=m_tk)
    else:
        o_v = (pt - NKT) * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv, m_mv = m_t[:, None] & m_v[None, :], m_m[:, None] & m_v[None, :]
        stv = (sidx * H + h) * (M * V) + o_m[:, None] * V + o_v[None, :]
        hv = tl.load(snap_v + stv, mask=m_mv, other=0.).to(tl.float32)
        dsv = tl.load(ds_v + stv, mask=m_mv, other=0.).to(tl.float32)
        tl.store(carry + coff, vsum(dsv * hv, 1), mask=m_m)
        dsv_d = dsv.to(DT)
        v_t = tl.load(v + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_tv, other=0.).to(DT)
        tl.store(part + poff, tl.dot(v_t, tl.trans(dsv_d), input_precision=PREC), mask=m_tm)
        dv_acc = tl.dot(w, dsv_d, input_precision=PREC)
        if SPEC:
            if regime == FACTORED:
                dv_acc = _dv_loop(do, prob, dv_acc, s_t, sn, b, eb, FACTORED, rows, o_v, o_m, m_tv, m_tm, h, H, G, V, M,
                                  C, DT, PREC)
            else:
                dv_acc = _dv_loop(do, prob, dv_acc, s_t, sn, b, eb, regime, rows, o_v, o_m, m_tv, m_tm, h, H, G, V,
                                  M, C, DT, PREC)
        else:
            dv_acc = _dv_loop(do, prob, dv_acc, s_t, sn, b, eb, regime, rows, o_v, o_m, m_tv, m_tm, h, H, G, V, M, C,
                              DT, PREC)
        tl.store(dv + rows[:, None] * (H * V) + h * V + o_v[None, :], dv_acc.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def _bwd_finish_kernel(s, g, r, dsx, part, carry, ds, dg, chunks, n_chunks, n_rows, H: tl.constexpr,
                       M: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, NT: tl.constexpr, THR: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    o_t, o_m = tl.arange(0, C), tl.arange(0, BM)
    m_t, m_m = o_t < length, o_m < M
    m_tm = m_t[:, None] & m_m[None, :]
    rows = tok0 + o_t
    off = rows[:, None] * (H * M) + h * M + o_m[None, :]
    s_t = tl.load(s + off, mask=m_tm, other=0.).to(tl.float32)
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    to_end = tl.exp(b_end[None, :] - b)
    kvd = tl.full([C, BM], 0., tl.float32)
    cs = tl.full([BM], 0., tl.float32)
    for pt in tl.static_range(NT):
        kvd += tl.load(part + (pt * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.)
        cs += tl.load(carry + (pt * n_chunks + c) * (H * M) + h * M + o_m, mask=m_m, other=0.)
    kvd *= to_end
    # dsx planes: q k^T part off the diagonal, with it; dO v^T part off the diagonal, with it
    ds_off = tl.load(dsx + off, mask=m_tm, other=0.)
    ds_off += tl.load(dsx + (2 * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.)
    db = tl.load(r + off, mask=m_tm, other=0.) - s_t * ds_off
    dg_t = vcumsum(db, True) + exclusive_cumsum(s_t * kvd) + (tl.exp(b_end) * cs)[None, :]
    tl.store(dg + off, dg_t.to(dg.dtype.element_ty), mask=m_tm)
    ds_t = tl.load(dsx + (n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.)
    ds_t += tl.load(dsx + (3 * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], mask=m_tm, other=0.)
    tl.store(ds + off, (ds_t + kvd).to(ds.dtype.element_ty), mask=m_tm)


def backward_inputs_split(p, do, prob, dy, r, dsx, snap_k, snap_v, ds_k, ds_v, tables, tile=64, num_warps=8,
                          num_stages=2, warps_finish=8, spec=False):
    """dq, dk, dv, ds, dg in the input dtype, from the prep kernel's R and the backward state
    kernels' dS and intra-chunk ds parts (dsx)."""
    d = p.dims
    dev = p.q.device
    n_chunks, C = tables.n_chunks, tables.C
    dq, dk, dv = torch.empty_like(p.q), torch.empty_like(p.k), torch.empty_like(p.v)
    ds, dg = torch.empty_like(p.s), torch.empty_like(p.g)
    if n_chunks:
        BK, BV = min(tile, p.BK), min(tile, p.BV)
        nkt, nvt = triton.cdiv(d.K, BK), triton.cdiv(d.V, BV)
        n_rows = d.B * d.T
        part = torch.empty(nkt + nvt, n_rows, d.H, d.M, device=dev, dtype=torch.float32)
        carry = torch.empty(nkt + nvt, n_chunks, d.H, d.M, device=dev, dtype=torch.float32)
        launch(_bwd_dqkv_kernel, ((nkt + nvt) * n_chunks, d.H),
            q=p.q, k=p.k, v=p.v, s=p.s, g=p.g, snap_k=snap_k, snap_v=snap_v, ds_k=ds_k, ds_v=ds_v, dy=dy, do=do,
            prob=prob, dq=dq, dk=dk, dv=dv, part=part, carry=carry, chunks=tables.chunks, n_chunks=n_chunks,
            n_rows=n_rows, H=d.H, G=d.G, K=d.K, V=d.V, M=d.M, C=C, BK=BK, BV=BV, BM=p.BM, NKT=nkt, SPEC=spec,
            DT=p.DT, PREC=p.PREC, THR=THRESH, num_warps=num_warps, num_stages=num_stages)
        _bwd_finish_kernel[(n_chunks, d.H)](
            s=p.s, g=p.g, r=r, dsx=dsx, part=part, carry=carry, ds=ds, dg=dg, chunks=tables.chunks,
            n_chunks=n_chunks, n_rows=n_rows, H=d.H, M=d.M, C=C, BM=p.BM, NT=nkt + nvt, THR=THRESH,
            num_warps=warps_finish)
    return dq, dk, dv, ds, dg
