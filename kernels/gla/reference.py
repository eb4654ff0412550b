"""The fp32 reference: gated linear attention as a plain loop over time, straight from the formulas.

Per kv head, with the state S (K x V):

    S_t = Diag(a_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,   a_t = exp(g_t)

g_t [K] holds the log forget gates (<= 0) of each key dimension: data-dependent in GLA, one
constant per head for the plain linear attention (RetNet/SUPRA decay), or 0 (no decay). Each
query head reads the state of its kv head (GQA: query head ``hq`` belongs to kv head
``hq // (HQ // H)``). Slow on purpose: every other implementation is tested against this one.
"""
from __future__ import annotations

import torch

from .contract import check_gla_inputs
from ..gsa.utils import compute_dtype, default_scale, sequence_spans


def gla_step(S, q_t, k_t, v_t, g_t, scale: float):
    """One token for every kv head of one sequence: S [H, K, V]; q_t [HQ, K]; k_t, g_t [H, K];
    v_t [H, V]. Returns (o_t [HQ, V], S)."""
    H = S.shape[0]
    S = S * g_t.exp()[:, :, None] + k_t[:, :, None] * v_t[:, None, :]
    o_t = scale * torch.einsum("hgk,hkv->hgv", q_t.reshape(H, -1, q_t.shape[-1]), S)
    return o_t.reshape(-1, S.shape[-1]), S


def recurrent_gla_loop(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                       dtype=None):
    """Run :func:`gla_step` over every token; state and arithmetic in ``dtype`` (default fp32,
    fp64 for fp64 inputs). Returns (o [B, T, HQ, V] in that dtype, final state [N, H, K, V] or None)."""
    dims = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    dt = dtype or compute_dtype(q.dtype)
    scale = default_scale(scale, dims.K)
    q, k, v, g = (x.to(dt) for x in (q, k, v, g))
    rows: list[list[torch.Tensor]] = [[] for _ in range(dims.B)]
    finals = []
    for n, (b, start, end) in enumerate(sequence_spans(dims, cu_seqlens)):
        S = q.new_zeros(dims.H, dims.K, dims.V) if initial_state is None else initial_state[n].to(dt)
        for t in range(start, end):
            o_t, S = gla_step(S, q[b, t], k[b, t], v[b, t], g[b, t], scale)
            rows[b].append(o_t)
        finals.append(S)
    empty = q.new_zeros(0, dims.HQ, dims.V)
    o = torch.stack([torch.stack(r) if r else empty for r in rows])
    return o, (torch.stack(finals) if output_final_state else None)


def naive_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Reference gated linear attention in fp32 (fp64 for fp64 inputs); the arguments of
    :func:`chunk_gla`."""
    return recurrent_gla_loop(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
