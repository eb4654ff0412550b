"""Chunked gated linear attention in plain torch: the training/prefill path, differentiated by autograd.

Tokens are split into chunks of C. Within a chunk, with b_t = cumsum(g) (per key dimension, from
the chunk start) and S the state entering the chunk:

    o_t = scale * ( (q_t * e^{b_t}) S + sum_{i<=t} (sum_k q_tk k_ik e^{b_tk - b_ik}) v_i )
    S'  = Diag(e^{b_C}) S + sum_i (k_i * e^{b_C - b_i}) v_i^T

The pairwise decay e^{b_t - b_i} is masked to -inf above the diagonal *before* the exp (no 0 * inf
with extreme gates), its diagonal is the constant 1 and each token's decay to the chunk end is a
reverse cumulative sum of the later gates, never a difference b_C - b_i: the differences would
send O(1) gradients into g that cancel in fp32 when the gates are near 0. Only the state is
carried from chunk to chunk, in a short loop; every other product is batched over all chunks.

Varlen batches and ragged tails are padded per sequence with g = 0 and k = 0, which leaves the
state untouched, so every sequence's final state is exact (the same layout as GSA's torch path).
"""
from __future__ import annotations

import torch

from .contract import check_gla_inputs
from ..gsa.chunk_torch import _from_padded_rows, padded_chunk_rows
from ..gsa.utils import compute_dtype, default_scale

DEFAULT_CHUNK = 16


def _chunked(q, k, v, g, scale, S, C):
    """Core on padded rows [N, NT * C, ...] in the compute dtype. Returns o, final S."""
    N, L, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G, NT = HQ // H, L // C
    q = q.view(N * NT, C, H, G, K)
    k = k.view(N * NT, C, H, K)
    v = v.view(N * NT, C, H, V)
    g = g.view(N * NT, C, H, K)
    b = g.cumsum(1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    earlier = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    diff = b[:, :, None] - b[:, None, :]  # [n, t, i, H, K]
    D = diff.masked_fill(~earlier[:, :, None, None], float("-inf")).exp() + eye[:, :, None, None]
    A = torch.einsum("nthgk,nihk,ntihk->nhgti", q, k, D)
    intra = torch.einsum("nhgti,nihv->nthgv", A, v)
    to_end = torch.cat([g[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(g[:, :1])], 1)
    U = torch.einsum("nchk,nchv->nhkv", k * to_end.exp(), v).view(N, NT, H, K, V)
    decay = b[:, -1].exp().view(N, NT, H, K)
    states = []  # the state entering each chunk
    for n in range(NT):
        states.append(S)
        S = S * decay[:, n, :, :, None] + U[:, n]
    Sin = torch.stack(states, 1).view(N * NT, H, K, V)
    inter = torch.einsum("nthgk,nhkv->nthgv", q * b.exp()[:, :, :, None], Sin)
    o = (scale * (inter + intra)).reshape(N, L, HQ, V)
    return o, S


def chunk_gla_torch(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    chunk_size: int = DEFAULT_CHUNK):
    """Chunked gated linear attention in torch (any device, autograd); the contract of ``chunk_gla``."""
    dims = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, dims.K)
    C = chunk_size
    rows, spans = padded_chunk_rows((q, k, v, g), dims, cu_seqlens, C, dt)
    S = rows[0].new_zeros(dims.N, dims.H, dims.K, dims.V) if initial_state is None else initial_state.to(dt)
    o, S = _chunked(*rows, scale, S, C)
    o = _from_padded_rows(o, spans, dims.B, dims.T).to(q.dtype)
    return o, (S if output_final_state else None)
