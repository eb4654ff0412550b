"""Recurrent GSA on Triton: the decoding step (one or a few new tokens per sequence).

One program per (sequence, kv head, block of the value dim). It keeps the kv head's slot keys
[K, M] and its block of slot values [M, BV] in registers (fp32), updates them token by token and
serves all G query heads of the group from them: one state pair per kv head, never repeated per
query head. No host synchronisation and no allocation besides the outputs, so the step can be
captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_inputs import prepare
from ._triton_intra import load_state, vmax, vsum
from .utils import GSAInputError


@triton.jit
def _recurrent_kernel(q, k, v, s, g, h0k, h0v, o, htk, htv, cu, T, scale, H: tl.constexpr, G: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      BM: tl.constexpr, VARLEN: tl.constexpr, USE_H0: tl.constexpr,
                      STORE_FINAL: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    if VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
    HQ: tl.constexpr = H * G
    o_k, o_v, o_m = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, BM)
    m_k, m_v, m_m = o_k < K, o_v < V, o_m < M
    hk, hv, st_k, st_v, m_km, m_mv = load_state(h0k, h0v, nh, o_k, o_v, o_m, m_k, m_v, m_m, K, V, M, BK, BV, BM,
                                                USE_H0)
    for t in range(bos, eos):
        kt = tl.load(k + (t * H + h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        vt = tl.load(v + (t * H + h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + o_m, mask=m_m, other=0.).to(tl.float32)
        alpha = tl.exp(tl.load(g + (t * H + h) * M + o_m, mask=m_m, other=0.).to(tl.float32))
        hk = hk * alpha[None, :] + kt[:, None] * st[None, :]
        hv = hv * alpha[:, None] + st[:, None] * vt[None, :]
        for i in range(G):
            hq = h * G + i
            qt = tl.load(q + (t * HQ + hq) * K + o_k, mask=m_k, other=0.).to(tl.float32)
            z = tl.where(m_m, vsum(qt[:, None] * hk, 0) * scale, float("-inf"))
            e = tl.exp(z - vmax(z, 0))
            p = e / vsum(e, 0)
            ot = vsum(p[:, None] * hv, 0)
            tl.store(o + (t * HQ + hq) * V + o_v, ot.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(htv + st_v, hv, mask=m_mv)
        if iv == 0:
            tl.store(htk + st_k, hk, mask=m_km)


def fused_recurrent_gsa_triton(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """Token-by-token GSA (Triton), for decoding. Same contract as
    :func:`t2r.kernels.gsa.fused_recurrent_gsa`; no backward (train with ``chunk_gsa``)."""
    if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, s, g, *(initial_state or ()))):
        raise GSAInputError(
            "fused_recurrent_gsa (triton) is the decoding kernel and has no backward; call it under "
            "torch.no_grad(), or use chunk_gsa for training")
    p = prepare(q, k, v, s, g, scale, initial_state, cu_seqlens, "fused_recurrent_gsa")
    d = p.dims
    dev = p.q.device
    o = torch.empty(d.B, d.T, d.HQ, d.V, device=dev, dtype=q.dtype)
    final = None
    if output_final_state:
        final = (torch.empty(d.N, d.H, d.K, d.M, device=dev, dtype=torch.float32),
                 torch.empty(d.N, d.H, d.M, d.V, device=dev, dtype=torch.float32))
    if d.N == 0:
        return o, final
    BV = min(64, p.BV)
    while BV > 16 and d.N * d.H * triton.cdiv(d.V, BV) < 264:
        BV //= 2
    cu = cu_seqlens if cu_seqlens is None else cu_seqlens.to(device=dev).contiguous()
    use_h0 = p.hk0 is not None
    ht_k, ht_v = final if final is not None else (o, o)
    _recurrent_kernel[(triton.cdiv(d.V, BV), d.N * d.H)](
        q=p.q, k=p.k, v=p.v, s=p.s, g=p.g, h0k=p.hk0 if use_h0 else ht_k, h0v=p.hv0 if use_h0 else ht_v, o=o,
        htk=ht_k, htv=ht_v, cu=cu if cu is not None else o, T=d.T, scale=p.scale, H=d.H, G=d.G, K=d.K, V=d.V,
        M=d.M, BK=p.BK, BV=BV, BM=p.BM, VARLEN=cu is not None, USE_H0=use_h0, STORE_FINAL=final is not None,
        num_warps=4)
    return o, final
