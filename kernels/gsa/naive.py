"""The fp32 reference: Gated Slot Attention as a plain loop over time, straight from the formulas.

Per kv head, with slot keys K~ (K x M, stored transposed) and slot values V~ (M x V):

    K~_t = K~_{t-1} Diag(alpha_t) + k_t s_t^T
    V~_t = Diag(alpha_t) V~_{t-1} + s_t v_t^T
    o_t  = V~_t^T softmax(scale * K~_t^T q_t)        (softmax over the M slots)

with alpha_t = exp(g_t). Each query head reads the state of its kv head (GQA: query head
``hq`` belongs to kv head ``hq // (HQ // H)``); states are never repeated per query head.
Slow on purpose: every other implementation is tested against this one.
"""
from __future__ import annotations

import torch

from .utils import check_inputs, compute_dtype, default_scale, sequence_spans


def gsa_step(hk, hv, q_t, k_t, v_t, s_t, g_t, scale: float):
    """One token for every kv head of one sequence.

    hk [H, K, M], hv [H, M, V] states; q_t [HQ, K]; k_t [H, K]; v_t [H, V]; s_t, g_t [H, M].
    Returns (o_t [HQ, V], hk, hv).
    """
    H = hk.shape[0]
    alpha = g_t.exp()
    hk = hk * alpha[:, None, :] + k_t[:, :, None] * s_t[:, None, :]
    hv = hv * alpha[:, :, None] + s_t[:, :, None] * v_t[:, None, :]
    q_t = q_t.reshape(H, -1, q_t.shape[-1])  # [H, G, K]
    p = (scale * torch.einsum("hgk,hkm->hgm", q_t, hk)).softmax(-1)
    o_t = torch.einsum("hgm,hmv->hgv", p, hv).reshape(-1, hv.shape[-1])
    return o_t, hk, hv


def recurrent_gsa_loop(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                       cu_seqlens=None, dtype=None):
    """Run :func:`gsa_step` over every token; states and arithmetic in ``dtype``.

    Returns (o [B, T, HQ, V] in ``dtype``, final_state or None).
    """
    dims = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    dt = dtype or compute_dtype(q.dtype)
    scale = default_scale(scale, dims.K)
    q, k, v, s, g = (x.to(dt) for x in (q, k, v, s, g))
    rows: list[list[torch.Tensor]] = [[] for _ in range(dims.B)]
    finals_k, finals_v = [], []
    for n, (b, start, end) in enumerate(sequence_spans(dims, cu_seqlens)):
        if initial_state is None:
            hk = q.new_zeros(dims.H, dims.K, dims.M)
            hv = q.new_zeros(dims.H, dims.M, dims.V)
        else:
            hk, hv = initial_state[0][n].to(dt), initial_state[1][n].to(dt)
        for t in range(start, end):
            o_t, hk, hv = gsa_step(hk, hv, q[b, t], k[b, t], v[b, t], s[b, t], g[b, t], scale)
            rows[b].append(o_t)
        finals_k.append(hk)
        finals_v.append(hv)
    empty = q.new_zeros(0, dims.HQ, dims.V)
    o = torch.stack([torch.stack(r) if r else empty for r in rows])
    final = (torch.stack(finals_k), torch.stack(finals_v)) if output_final_state else None
    return o, final


def naive_recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """Reference GSA in fp32 (fp64 for fp64 inputs). Same API as :func:`chunk_gsa`.

    Args:
        q: [B, T, HQ, K] queries; HQ a multiple of H.
        k: [B, T, H, K] keys.  v: [B, T, H, V] values.
        s: [B, T, H, M] slot write weights.  g: [B, T, H, M] log forget gates (<= 0).
        scale: logit scale, default K ** -0.5.
        initial_state: optional (slot keys [N, H, K, M], slot values [N, H, M, V]).
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: optional [N + 1] offsets of N sequences packed along T (B must be 1).
    Returns:
        o [B, T, HQ, V] in the compute dtype (fp32/fp64) and the final state (or None).
    """
    return recurrent_gsa_loop(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
