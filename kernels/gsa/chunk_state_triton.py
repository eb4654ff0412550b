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

from .chunk_intra_triton import THRESH, chunk_gates


@triton.jit
def _fwd_state_tile(x, s, g, h0, snap, ht, pd, n, h, bos, eos, soff, H: tl.constexpr, D: tl.constexpr,
                    M: tl.constexpr, sd: tl.constexpr, sm: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                    BM: tl.constexpr, USE_H0: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                    THR: tl.constexpr):
    o_t = tl.arange(0, C)
    o_d = pd * BD + tl.arange(0, BD)
    o_m = tl.arange(0, BM)
    m_d, m_m = o_d < D, o_m < M
    st = o_d[:, None] * sd + o_m[None, :] * sm
    m_st = m_d[:, None] & m_m[None, :]
    nh = n * H + h
    if USE_H0:
        hs = tl.load(h0 + nh * (D * M) + st, mask=m_st, other=0.).to(tl.float32)
    else:
        hs = tl.full([BD, BM], 0., tl.float32)
    nc = (eos - bos + C - 1) // C
    for j in range(nc):
        tl.store(snap + ((soff + j) * H + h) * (D * M) + st, hs.to(snap.dtype.element_ty), mask=m_st)
        rows = bos + j * C + o_t
        m_t = rows < eos
        xg = tl.load(x + rows[:, None] * (H * D) + h * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                     other=0.).to(DT)
        sg = tl.load(s + rows[:, None] * (H * M) + h * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :],
                     other=0.).to(tl.float32)
        b, b_end, eb, enb, safe = chunk_gates(g, bos * (H * M) + j * C * (H * M) + h * M, H * M, o_t, m_t,
                                              o_m, m_m, C, THR)
        w = sg * tl.exp(b_end[None, :] - b)
        hs = hs * tl.exp(b_end)[None, :] + tl.dot(tl.trans(xg), w.to(DT), input_precision=PREC)
    tl.store(snap + ((soff + nc) * H + h) * (D * M) + st, hs.to(snap.dtype.element_ty), mask=m_st)
    tl.store(ht + nh * (D * M) + st, hs, mask=m_st)


@triton.jit
def _fwd_state_kernel(k, v, s, g, h0k, h0v, snap_k, snap_v, htk, htv, seq, H: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                      NBK: tl.constexpr, USE_H0: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      THR: tl.constexpr):
    """Programs pd < NBK own row tiles of the slot keys [K, M]; the others column tiles of the slot
    values [M, V] (seen as [V, M]). Both kinds run in one launch: each walks its chunks in order."""
    pd, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos = tl.load(seq + n * 3).to(tl.int64)
    eos = tl.load(seq + n * 3 + 1).to(tl.int64)
    soff = tl.load(seq + n * 3 + 2).to(tl.int64)
    if pd < NBK:
        _fwd_state_tile(k, s, g, h0k, snap_k, htk, pd, n, h, bos, eos, soff, H, K, M, M, 1, C, BD, BM, USE_H0, DT,
                        PREC, THR)
    else:
        _fwd_state_tile(v, s, g, h0v, snap_v, htv, pd - NBK, n, h, bos, eos, soff, H, V, M, 1, V, C, BD, BM, USE_H0,
                        DT, PREC, THR)


@triton.jit
def _bwd_state_tile(x, f, g, dht, dsnap, dh0, pd, n, h, bos, eos, soff, H: tl.constexpr, G: tl.constexpr,
                    D: tl.constexpr, M: tl.constexpr, sd: tl.constexpr, sm: tl.constexpr, C: tl.constexpr,
                    BD: tl.constexpr, BM: tl.constexpr, USE_DHT: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr, THR: tl.constexpr):
    o_t = tl.arange(0, C)
    o_d = pd * BD + tl.arange(0, BD)
    o_m = tl.arange(0, BM)
    m_d, m_m = o_d < D, o_m < M
    st = o_d[:, None] * sd + o_m[None, :] * sm
    m_st = m_d[:, None] & m_m[None, :]
    nh = n * H + h
    if USE_DHT:
        hs = tl.load(dht + nh * (D * M) + st, mask=m_st, other=0.).to(tl.float32)
    else:
        hs = tl.full([BD, BM], 0., tl.float32)
    nc = (eos - bos + C - 1) // C
    for jj in range(nc):
        j = nc - 1 - jj
        tl.store(dsnap + ((soff + j) * H + h) * (D * M) + st, hs.to(dsnap.dtype.element_ty), mask=m_st)
        rows = bos + j * C + o_t
        m_t = rows < eos
        b, b_end, eb, enb, safe = chunk_gates(g, bos * (H * M) + j * C * (H * M) + h * M, H * M, o_t, m_t,
                                              o_m, m_m, C, THR)
        u = tl.full([BD, BM], 0., tl.float32)
        for i in range(G):
            hq = h * G + i
            xg = tl.load(x + rows[:, None] * (H * G * D) + hq * D + o_d[None, :],
                         mask=m_t[:, None] & m_d[None, :], other=0.).to(DT)
            fg = tl.load(f + rows[:, None] * (H * G * M) + hq * M + o_m[None, :],
                         mask=m_t[:, None] & m_m[None, :], other=0.).to(tl.float32)
            u += tl.dot(tl.trans(xg), (fg * eb).to(DT), input_precision=PREC)
        hs = hs * tl.exp(b_end)[None, :] + u
    tl.store(dh0 + nh * (D * M) + st, hs, mask=m_st)


@triton.jit
def _bwd_state_kernel(q, do, dy, prob, g, dhtk, dhtv, ds_k, ds_v, dh0k, dh0v, seq, H: tl.constexpr,
                      G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                      BD: tl.constexpr, BM: tl.constexpr, NBK: tl.constexpr, USE_DHT: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr, THR: tl.constexpr):
    pd, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos = tl.load(seq + n * 3).to(tl.int64)
    eos = tl.load(seq + n * 3 + 1).to(tl.int64)
    soff = tl.load(seq + n * 3 + 2).to(tl.int64)
    if pd < NBK:
        _bwd_state_tile(q, dy, g, dhtk, ds_k, dh0k, pd, n, h, bos, eos, soff, H, G, K, M, M, 1, C, BD, BM, USE_DHT,
                        DT, PREC, THR)
    else:
        _bwd_state_tile(do, prob, g, dhtv, ds_v, dh0v, pd - NBK, n, h, bos, eos, soff, H, G, V, M, 1, V, C, BD, BM,
                        USE_DHT, DT, PREC, THR)


def _block_d(D: int, programs: int) -> int:
    """Tile rows per program: 64, or fewer when there are too few (sequence, head) pairs to fill the GPU."""
    bd = min(64, max(16, triton.next_power_of_2(D)))
    while bd > 16 and programs * triton.cdiv(D, bd) < 512:
        bd //= 2
    return bd


def forward_states(p, seq, n_snap, C, num_warps=4, num_stages=2):
    """Snapshots of both states entering every chunk, plus the fp32 final states."""
    d = p.dims
    dev = p.q.device
    snap_k = torch.empty(n_snap, d.H, d.K, d.M, device=dev, dtype=p.snap_dtype)
    snap_v = torch.empty(n_snap, d.H, d.M, d.V, device=dev, dtype=p.snap_dtype)
    ht_k = torch.empty(d.N, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    ht_v = torch.empty(d.N, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    use_h0 = p.hk0 is not None
    BD = _block_d(max(d.K, d.V), 2 * d.N * d.H)
    nbk = triton.cdiv(d.K, BD)
    if d.N:
        _fwd_state_kernel[(nbk + triton.cdiv(d.V, BD), d.N * d.H)](
            p.k, p.v, p.s, p.g, p.hk0 if use_h0 else ht_k, p.hv0 if use_h0 else ht_v, snap_k, snap_v, ht_k, ht_v,
            seq, H=d.H, K=d.K, V=d.V, M=d.M, C=C, BD=BD, BM=p.BM, NBK=nbk, USE_H0=use_h0, DT=p.DT, PREC=p.PREC,
            THR=THRESH, num_warps=num_warps, num_stages=num_stages)
    return snap_k, snap_v, ht_k, ht_v


def backward_states(p, q, do, dy, prob, dht_k, dht_v, seq, n_snap, C, num_warps=4, num_stages=2):
    """Gradients of the states leaving every chunk (dS) and of the initial states (fp32)."""
    d = p.dims
    dev = q.device
    ds_k = torch.empty(n_snap, d.H, d.K, d.M, device=dev, dtype=p.snap_dtype)
    ds_v = torch.empty(n_snap, d.H, d.M, d.V, device=dev, dtype=p.snap_dtype)
    dh0_k = torch.empty(d.N, d.H, d.K, d.M, device=dev, dtype=torch.float32)
    dh0_v = torch.empty(d.N, d.H, d.M, d.V, device=dev, dtype=torch.float32)
    use_dht = dht_k is not None
    BD = _block_d(max(d.K, d.V), 2 * d.N * d.H)
    nbk = triton.cdiv(d.K, BD)
    if d.N:
        _bwd_state_kernel[(nbk + triton.cdiv(d.V, BD), d.N * d.H)](
            q, do, dy, prob, p.g, dht_k if use_dht else dh0_k, dht_v if use_dht else dh0_v, ds_k, ds_v, dh0_k, dh0_v,
            seq, H=d.H, G=d.G, K=d.K, V=d.V, M=d.M, C=C, BD=BD, BM=p.BM, NBK=nbk, USE_DHT=use_dht, DT=p.DT,
            PREC=p.PREC, THR=THRESH, num_warps=num_warps, num_stages=num_stages)
    return ds_k, ds_v, dh0_k, dh0_v
