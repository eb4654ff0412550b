"""Chunk-boundary states of chunked GSA: the forward snapshots and the backward state gradients.

Per kv head both states are "X^T W" sums over tokens with a per-slot decay, so one kernel shape
serves both: a program owns a [BD, M] tile of one state (rows of the slot keys [K, M], or
columns of the slot values [M, V] seen transposed) and walks the chunks of one sequence.

forward   H_{j+1} = exp(b_end) * H_j + x^T (s * exp(b_end - b))          x = k or v
backward  dS_{j-1} = exp(b_end) * dS_j + sum_{query heads} x^T (f * exp(b))
          x = q, f = dY (grad of the unscaled slot logits), or x = dO, f = p (slot probabilities)

Snapshots: sequence n owns entries off_n .. off_n + nchunks; forward entry off_n + j is the state
entering chunk j (the last one is the final state); backward entry off_n + j is the gradient of
the state leaving chunk j. Every exponent here is <= 0: no overflow for any gate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_intra import FACTORED, THRESH, chunk_gates, diag, op1t, vsum
from ._triton_launch import launch


# ------------------------------------------------------------------ chunk-parallel form + scan
#
# Walking the chunks of a sequence one after the other (the first kernels, before 2026-11-28) is a
# long chain of dependent loads and products per step. The states come from two cheaper launches:
#
#   local  (one program per (chunk, kv head, state)): the chunk's own contribution
#          forward   U_j = x_j^T (s exp(b_end - b))          backward  U_j = sum_heads x_j^T (f exp(b))
#          and (forward) the chunk's decay d_j = exp(b_end), into a [chunks, H, M] table;
#   scan   (one program per (sequence, kv head, block of state elements)): H_{j+1} = d_j H_j + U_j
#          (forward) or dS_{j-1} = d_j dS_j + U_j (backward), NB chunks at a time through an
#          associative scan of (d, U) pairs, in place in the snapshot buffer.
#
# In-place slots. Forward: U_j is written where H_{j+1} goes (entry off_n + j + 1), the scan reads
# it and writes H_{j+1} over it. Backward: entry off_n + j will hold dS_j (the gradient of the
# state leaving chunk j) = d_{j+1} dS_{j+1} + U_{j+1}, so U_{j+1} is written at off_n + j and U_0
# at the sequence's spare entry off_n + nchunks (table `bslot`); the scan reads and overwrites each
# entry with the same element in the same thread.


@triton.jit
def _local_fwd_kernel(k, v, s, g, u_k, u_v, dec, chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      M: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr, THR: tl.constexpr):
    # grid (2 * chunks, H): the two states of one chunk are neighbours (they share s and g in L2)
    c, role, h = tl.program_id(0) // 2, tl.program_id(0) % 2, tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    slot = tl.load(chunks + c * 3 + 2).to(tl.int64) + 1
    o_t, o_m = tl.arange(0, C), tl.arange(0, BM)
    m_t, m_m = o_t < length, o_m < M
    rows = tok0 + o_t
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    sg = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :],
                 other=0.).to(tl.float32)
    w = (sg * tl.exp(b_end[None, :] - b)).to(DT)
    if role == 0:
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        # (names differ between the branches: Triton merges a name both assign, and BK may differ from BV)
        x_k = tl.load(k + rows[:, None] * (H * K) + h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.).to(DT)
        uk = tl.dot(tl.trans(x_k), w, input_precision=PREC)  # [BK, BM]
        tl.store(u_k + (slot * H + h) * (K * M) + o_k[:, None] * M + o_m[None, :], uk,
                 mask=m_k[:, None] & m_m[None, :])
        tl.store(dec + (c * H + h) * M + o_m, tl.exp(b_end), mask=m_m)
    else:
        o_v = tl.arange(0, BV)
        m_v = o_v < V
        x_v = tl.load(v + rows[:, None] * (H * V) + h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0.).to(DT)
        uv = tl.dot(tl.trans(x_v), w, input_precision=PREC)  # [BV, BM], stored as [M, V]
        tl.store(u_v + (slot * H + h) * (M * V) + o_m[None, :] * V + o_v[:, None], uv,
                 mask=m_v[:, None] & m_m[None, :])


@triton.jit
def _local_bwd_tile(x, f, y, u, dsx, row_d, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb, enb, regime, H: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, M: tl.constexpr, sd: tl.constexpr, sm: tl.constexpr,
                    C: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, DS: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr):
    """U = sum_heads x^T (f exp(b)) into entry `slot` of u; with DS also the intra-chunk slot-write
    gradient sum_heads op1t(x y^T, f) (off the diagonal) and that plus its diagonal terms, into
    dsx[row_d] and dsx[row_d + 1] ([rows, H, M] fp32 each)."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_td, m_tm = m_t[:, None] & m_d[None, :], m_t[:, None] & m_m[None, :]
    acc = tl.full([BD, BM], 0., tl.float32)
    if DS:
        y_t = tl.load(y + rows[:, None] * (H * D) + h * D + o_d[None, :], mask=m_td, other=0.).to(DT)
        off = tl.full([C, BM], 0., tl.float32)
        dia = tl.full([C, BM], 0., tl.float32)
    for i in range(G):
        hq = h * G + i
        xg = tl.load(x + rows[:, None] * (H * G * D) + hq * D + o_d[None, :], mask=m_td, other=0.).to(DT)
        fg = tl.load(f + rows[:, None] * (H * G * M) + hq * M + o_m[None, :], mask=m_tm, other=0.).to(tl.float32)
        acc += tl.dot(tl.trans(xg), (fg * eb).to(DT), input_precision=PREC)
        if DS:
            a = tl.dot(xg, tl.trans(y_t), input_precision=PREC)
            off += op1t(a, fg, b, eb, enb, regime, C, DT, PREC)
            dia += diag(a, C)[:, None] * fg
    tl.store(u + (slot * H + h) * (D * M) + o_d[:, None] * sd + o_m[None, :] * sm, acc,
             mask=m_d[:, None] & m_m[None, :])
    if DS:
        tl.store(dsx + (row_d * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], off, mask=m_tm)
        tl.store(dsx + ((row_d + 1) * n_rows + rows[:, None]) * (H * M) + h * M + o_m[None, :], off + dia, mask=m_tm)


@triton.jit
def _local_bwd_kernel(q, k, v, do, dy, prob, g, u_k, u_v, dsx, chunks, bslot, n_rows, H: tl.constexpr,
                      G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, DS: tl.constexpr, SPEC: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr, THR: tl.constexpr):
    """role 0: the slot keys' contribution (x = q, f = dY; with DS the q k^T part of ds);
    role 1: the slot values' (x = dO, f = p; with DS the dO v^T part of ds). Grid (2 * chunks, H)."""
    c, role, h = tl.program_id(0) // 2, tl.program_id(0) % 2, tl.program_id(1)
    tok0 = tl.load(chunks + c * 3).to(tl.int64)
    length = tl.load(chunks + c * 3 + 1)
    slot = tl.load(bslot + c).to(tl.int64)
    o_t, o_m = tl.arange(0, C), tl.arange(0, BM)
    m_t, m_m = o_t < length, o_m < M
    rows = tok0 + o_t
    b, b_end, eb, enb, regime = chunk_gates(g, tok0 * (H * M) + h * M, H * M, o_t, m_t, o_m, m_m, C, THR)
    if SPEC:  # a copy for factored chunks (only their gate tiles live), one for the rest
        if regime == FACTORED:
            _local_bwd_role(q, k, v, do, dy, prob, u_k, u_v, dsx, role, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb,
                            enb, FACTORED, H, G, K, V, M, C, BK, BV, BM, DS, DT, PREC)
        else:
            _local_bwd_role(q, k, v, do, dy, prob, u_k, u_v, dsx, role, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb,
                            enb, regime, H, G, K, V, M, C, BK, BV, BM, DS, DT, PREC)
    else:
        _local_bwd_role(q, k, v, do, dy, prob, u_k, u_v, dsx, role, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb, enb,
                        regime, H, G, K, V, M, C, BK, BV, BM, DS, DT, PREC)


@triton.jit
def _local_bwd_role(q, k, v, do, dy, prob, u_k, u_v, dsx, role, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb, enb,
                    regime, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, DS: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr):
    if role == 0:
        _local_bwd_tile(q, dy, k, u_k, dsx, 0, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb, enb, regime, H, G, K, M,
                        M, 1, C, BK, BM, DS, DT, PREC)
    else:
        _local_bwd_tile(do, prob, v, u_v, dsx, 2, rows, m_t, o_m, m_m, h, slot, n_rows, b, eb, enb, regime, H, G, V,
                        M, 1, V, C, BV, BM, DS, DT, PREC)


@triton.jit
def _affine_combine(d1, u1, d2, u2):
    """(d1, u1) then (d2, u2): x -> d2 (d1 x + u1) + u2."""
    return d1 * d2, u1 * d2 + u2


@triton.jit
def _scan_tile(u, w, dec, h0, ht, pe, n, h, bos, eos, soff, H: tl.constexpr, DM: tl.constexpr, M: tl.constexpr,
               MDIV: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, BE: tl.constexpr, REV: tl.constexpr,
               USE_H0: tl.constexpr):
    o_e = pe * BE + tl.arange(0, BE)
    m_e = o_e < DM
    mi = (o_e // MDIV) % M  # slot of each state element
    o_r = tl.arange(0, NB)
    nh = n * H + h
    nc = ((eos - bos + C - 1) // C).to(tl.int32)
    c0 = soff - n  # global index of the sequence's first chunk
    if USE_H0:
        hs = tl.load(h0 + nh * DM + o_e, mask=m_e, other=0.).to(tl.float32)
    else:
        hs = tl.full([BE], 0., tl.float32)
    if not REV:
        tl.store(w + (soff * H + h) * DM + o_e, hs.to(w.dtype.element_ty), mask=m_e)
    for blk in range(0, (nc + NB - 1) // NB):
        if REV:
            j = nc - 1 - blk * NB - o_r  # position (chunk) written, last chunk first
            ok = j >= 0
            rd = ok & (j + 1 < nc)  # reads U_{j+1}, d_{j+1}
            slot = soff + j
            dch = c0 + j + 1
        else:
            j = blk * NB + o_r
            ok = j < nc
            rd = ok
            slot = soff + j + 1
            dch = c0 + j
        off = (slot[:, None] * H + h) * DM + o_e[None, :]
        uu = tl.load(u + off, mask=rd[:, None] & m_e[None, :], other=0.).to(tl.float32)
        dd = tl.load(dec + (dch[:, None] * H + h) * M + mi[None, :], mask=rd[:, None] & m_e[None, :], other=1.)
        if NB == 1:
            hb = dd * hs[None, :] + uu
        else:
            dc, uc = tl.associative_scan((dd, uu), 0, _affine_combine)
            hb = dc * hs[None, :] + uc
        tl.store(w + off, hb.to(w.dtype.element_ty), mask=ok[:, None] & m_e[None, :])
        hs = vsum(tl.where(o_r[:, None] == NB - 1, hb, 0.), 0)
    if REV:  # gradient of the state entering chunk 0: d_0 dS_0 + U_0 (U_0 in the spare entry)
        has = (o_e * 0 + nc) > 0
        u0 = tl.load(u + ((soff + nc) * H + h) * DM + o_e, mask=m_e & has, other=0.).to(tl.float32)
        d0 = tl.load(dec + (c0 * H + h) * M + mi, mask=m_e & has, other=1.)
        hs = d0 * hs + u0
    tl.store(ht + nh * DM + o_e, hs, mask=m_e)


@triton.jit
def _scan_fwd_kernel(u_k, u_v, w_k, w_v, dec, h0k, h0v, htk, htv, seq, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     M: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, BE: tl.constexpr, NEK: tl.constexpr,
                     USE_H0: tl.constexpr):
    """Programs pe < NEK scan element blocks of the slot keys [K, M], the others of the slot values
    [M, V]; each walks its sequence's chunks NB at a time."""
    pe, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos = tl.load(seq + n * 3).to(tl.int64)
    eos = tl.load(seq + n * 3 + 1).to(tl.int64)
    soff = tl.load(seq + n * 3 + 2).to(tl.int64)
    if pe < NEK:
        _scan_tile(u_k, w_k, dec, h0k, htk, pe, n, h, bos, eos, soff, H, K * M, M, 1, C, NB, BE, False, USE_H0)
    else:
        _scan_tile(u_v, w_v, dec, h0v, htv, pe - NEK, n, h, bos, eos, soff, H, M * V, M, V, C, NB, BE, False, USE_H0)


@triton.jit
def _scan_bwd_kernel(u_k, u_v, w_k, w_v, dec, h0k, h0v, htk, htv, seq, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     M: tl.constexpr, C: tl.constexpr, NB: tl.constexpr, BE: tl.constexpr, NEK: tl.constexpr,
                     USE_H0: tl.constexpr):
    """The reverse scan of the state gradients (same layout as _scan_fwd_kernel)."""
    pe, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos = tl.load(seq + n * 3).to(tl.int64)
    eos = tl.load(seq + n * 3 + 1).to(tl.int64)
    soff = tl.load(seq + n * 3 + 2).to(tl.int64)
    if pe < NEK:
        _scan_tile(u_k, w_k, dec, h0k, htk, pe, n, h, bos, eos, soff, H, K * M, M, 1, C, NB, BE, True, USE_H0)
    else:
        _scan_tile(u_v, w_v, dec, h0v, htv, pe - NEK, n, h, bos, eos, soff, H, M * V, M, V, C, NB, BE, True, USE_H0)


# Chunks per scan step, state elements per program. The interpreter runs a scan with a custom
# combine one element at a time, so on CPU the scan takes one chunk per step unless told otherwise.
SCAN_NB, SCAN_BE, SCAN_NB_CPU, SCAN_BE_CPU = 16, 128, 1, 1024


def _scan_nb(x):
    return SCAN_NB if x.is_cuda else SCAN_NB_CPU


def _scan_be(x):
    return SCAN_BE if x.is_cuda else SCAN_BE_CPU


def forward_states_scan(p, tables, num_warps=4, num_stages=2):
    """Snapshots of both states entering every chunk and the fp32 final states, plus the per-chunk decays
    [chunks, H, M] (fp32) that the backward scan reuses."""
    d = p.dims
    dev = p.q.device
    n_snap, n_chunks, C = tables.n_snap, tables.n_chunks, tables.C
    f32 = p.snap_dtype == torch.float32
    snap_k = torch.empty(n_snap, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    snap_v = torch.empty(n_snap, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    ht_k = torch.empty(d.N, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    ht_v = torch.empty(d.N, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    dec = torch.empty(max(n_chunks, 1), d.H, d.M, device=dev, dtype=torch.float32)
    if n_chunks:
        launch(_local_fwd_kernel, (2 * n_chunks, d.H),
            k=p.k, v=p.v, s=p.s, g=p.g, u_k=snap_k, u_v=snap_v, dec=dec, chunks=tables.chunks, H=d.H, K=d.K, V=d.V,
            M=d.M, C=C, BK=p.BK, BV=p.BV, BM=p.BM, DT=p.DT, PREC=p.PREC, THR=THRESH, num_warps=num_warps,
            num_stages=num_stages)
    use_h0 = p.hk0 is not None
    # the scan reads the fp32 contributions and writes the states in the snapshot dtype (in place for fp32)
    out_k, out_v = (snap_k, snap_v) if f32 else (torch.empty_like(snap_k, dtype=p.snap_dtype),
                                                 torch.empty_like(snap_v, dtype=p.snap_dtype))
    if d.N:
        be = _scan_be(p.q)
        nek, nev = triton.cdiv(d.K * d.M, be), triton.cdiv(d.M * d.V, be)
        _scan_fwd_kernel[(nek + nev, d.N * d.H)](
            u_k=snap_k, u_v=snap_v, w_k=out_k, w_v=out_v, dec=dec, h0k=p.hk0 if use_h0 else ht_k,
            h0v=p.hv0 if use_h0 else ht_v, htk=ht_k, htv=ht_v, seq=tables.seq, H=d.H, K=d.K, V=d.V, M=d.M, C=C,
            NB=_scan_nb(p.q), BE=be, NEK=nek, USE_H0=use_h0, num_warps=4)
    return out_k, out_v, ht_k, ht_v, dec


def backward_states_scan(p, do, dy, prob, dht_k, dht_v, tables, dec, num_warps=4, num_stages=2, ds=False,
                         spec=False):
    """Gradients of the states leaving every chunk (dS) and of the initial states (fp32), from the
    chunk-parallel contributions and a scan.
    With ds=True also the intra-chunk slot-write gradients dsx [4, B*T, H, M] (fp32): the q k^T
    part off the diagonal, the same with the diagonal, then the dO v^T part likewise."""
    d = p.dims
    dev = p.q.device
    n_snap, n_chunks, C = tables.n_snap, tables.n_chunks, tables.C
    ds_k = torch.empty(n_snap, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    ds_v = torch.empty(n_snap, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    dh0_k = torch.empty(d.N, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    dh0_v = torch.empty(d.N, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    n_rows = d.B * d.T
    dsx = torch.empty(4, n_rows, d.H, d.M, device=dev, dtype=torch.float32) if ds else dh0_k
    if n_chunks:
        launch(_local_bwd_kernel, (2 * n_chunks, d.H),
            q=p.q, k=p.k, v=p.v, do=do, dy=dy, prob=prob, g=p.g, u_k=ds_k, u_v=ds_v, dsx=dsx, chunks=tables.chunks,
            bslot=tables.bslot, n_rows=n_rows, H=d.H, G=d.G, K=d.K, V=d.V, M=d.M, C=C, BK=p.BK, BV=p.BV, BM=p.BM,
            DS=ds, SPEC=spec, DT=p.DT, PREC=p.PREC, THR=THRESH, num_warps=num_warps, num_stages=num_stages)
    use_dht = dht_k is not None
    f32 = p.snap_dtype == torch.float32
    out_k, out_v = (ds_k, ds_v) if f32 else (torch.empty_like(ds_k, dtype=p.snap_dtype),
                                             torch.empty_like(ds_v, dtype=p.snap_dtype))
    if d.N:
        be = _scan_be(p.q)
        nek, nev = triton.cdiv(d.K * d.M, be), triton.cdiv(d.M * d.V, be)
        _scan_bwd_kernel[(nek + nev, d.N * d.H)](
            u_k=ds_k, u_v=ds_v, w_k=out_k, w_v=out_v, dec=dec, h0k=dht_k if use_dht else dh0_k,
            h0v=dht_v if use_dht else dh0_v, htk=dh0_k, htv=dh0_v, seq=tables.seq, H=d.H, K=d.K, V=d.V, M=d.M, C=C,
            NB=_scan_nb(p.q), BE=be, NEK=nek, USE_H0=use_dht, num_warps=4)
    return (out_k, out_v, dh0_k, dh0_v, dsx) if ds else (out_k, out_v, dh0_k, dh0_v)
