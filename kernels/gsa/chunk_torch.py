"""Chunked GSA in plain torch: the CPU training path, differentiated by autograd.

Tokens are split into chunks of C. Within a chunk, with b_t = cumsum(g) (per slot, from the
chunk start), both passes share one decay tensor D[t, i, m] = exp(b_tm - b_im) for i <= t
(masked to -inf *before* the exp, so no 0 * inf). Between chunks only the two states are
carried, in a short loop over chunks; every other product is batched over all chunks.

    pass 1  logits_t = scale * ( e^{b_t} * (q_t Hk) + sum_{i<=t} (q_t . k_i) s_i D[t, i] )
    softmax p_t over the M slots (fp32)
    pass 2  o_t = (p_t * e^{b_t}) Hv + sum_{i<=t} (sum_m p_tm s_im D[t, i, m]) v_i

Varlen batches and ragged tails are padded per sequence with g = 0 and s = 0, which leaves
the state untouched, so the final state of each sequence is exact.
"""
from __future__ import annotations

import torch

from .utils import GSADims, check_inputs, compute_dtype, default_scale, sequence_spans

DEFAULT_CHUNK = 16


def _to_padded_rows(x: torch.Tensor, spans, length: int) -> torch.Tensor:
    """[B, T, ...] -> [N, length, ...]: one zero-padded row per sequence."""
    out = x.new_zeros(len(spans), length, *x.shape[2:])
    for n, (b, start, end) in enumerate(spans):
        out[n, : end - start] = x[b, start:end]
    return out


def padded_chunk_rows(xs, dims, cu_seqlens, chunk_size: int, dtype: torch.dtype):
    """Each tensor of ``xs`` ([B, T, ...]) as one zero-padded row per sequence (``cu_seqlens``: packed
    sequences), every row a whole number of chunks long, in ``dtype``; and the sequences' spans."""
    spans = sequence_spans(dims, cu_seqlens)
    longest = max((end - start for _, start, end in spans), default=0)
    length = max(chunk_size, -(-longest // chunk_size) * chunk_size)
    return [_to_padded_rows(x.to(dtype), spans, length) for x in xs], spans


def _from_padded_rows(x: torch.Tensor, spans, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`_to_padded_rows` (drops the padding)."""
    if len(spans) == B and all(start == 0 and end == T for _, start, end in spans):
        return x[:, :T]
    pieces = [x[n, : end - start] for n, (_, start, end) in enumerate(spans)]
    return torch.cat(pieces, dim=0).unsqueeze(0)


def _chunked(q, k, v, s, g, scale, hk, hv, C):
    """Core on padded rows [N, NT * C, ...] in the compute dtype. Returns o, hk, hv."""
    N, L, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    G, NT = HQ // H, L // C
    q = q.view(N, NT, C, H, G, K)
    k = k.view(N, NT, C, H, K)
    v = v.view(N, NT, C, H, V)
    s = s.view(N, NT, C, H, M)
    b = g.view(N, NT, C, H, M).cumsum(2)
    # The diagonal of D is the constant 1 and the last token's decay to the chunk end is the
    # constant 0: written as b_t - b_t they would send two O(1) gradients into g that cancel
    # in fp32 and swamp dg when the gates are near 0 (dg ~ alpha ~ 1e-13).
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    earlier = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    diff = b[:, :, :, None] - b[:, :, None, :]  # [N, NT, t, i, H, M]
    D = diff.masked_fill(~earlier[:, :, None, None], float("-inf")).exp() + eye[:, :, None, None]
    Ds = D * s[:, :, None]  # decay times the write weight of token i
    b_end = b[:, :, -1]  # [N, NT, H, M]
    g = g.view(N, NT, C, H, M)
    to_end = torch.cat([g[:, :, 1:].flip(2).cumsum(2).flip(2), torch.zeros_like(g[:, :, :1])], 2)
    w = to_end.exp() * s  # each token's write, decayed to the chunk end
    U1 = torch.einsum("nchk,nchm->nhkm", k.reshape(N * NT, C, H, K), w.reshape(N * NT, C, H, M))
    U2 = torch.einsum("nchm,nchv->nhmv", w.reshape(N * NT, C, H, M), v.reshape(N * NT, C, H, V))
    U1, U2 = U1.view(N, NT, H, K, M), U2.view(N, NT, H, M, V)
    decay = b_end.exp()
    Hk, Hv = [], []  # state entering each chunk
    for n in range(NT):
        Hk.append(hk)
        Hv.append(hv)
        hk = hk * decay[:, n, :, None, :] + U1[:, n]
        hv = hv * decay[:, n, :, :, None] + U2[:, n]
    Hk, Hv = torch.stack(Hk, 1), torch.stack(Hv, 1)
    eb = b.exp()[:, :, :, :, None, :]  # [N, NT, C, H, 1, M]
    inter = torch.einsum("nthgk,nhkm->nthgm", q.reshape(N * NT, C, H, G, K), Hk.reshape(N * NT, H, K, M))
    qk = torch.einsum("nthgk,nihk->nhgti", q.reshape(N * NT, C, H, G, K), k.reshape(N * NT, C, H, K))
    intra = torch.einsum("nhgti,ntihm->nthgm", qk, Ds.reshape(N * NT, C, C, H, M))
    logits = scale * (inter.view(N, NT, C, H, G, M) * eb + intra.view(N, NT, C, H, G, M))
    p = logits.softmax(-1)
    inter = torch.einsum("nthgm,nhmv->nthgv", (p * eb).reshape(N * NT, C, H, G, M), Hv.reshape(N * NT, H, M, V))
    A = torch.einsum("nthgm,ntihm->nhgti", p.reshape(N * NT, C, H, G, M), Ds.reshape(N * NT, C, C, H, M))
    intra = torch.einsum("nhgti,nihv->nthgv", A, v.reshape(N * NT, C, H, V))
    o = (inter + intra).reshape(N, L, HQ, V)
    return o, hk, hv


def chunk_gsa_torch(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, chunk_size: int = DEFAULT_CHUNK):
    """Chunked GSA in torch (any device, autograd). Same API and contract as ``chunk_gsa``."""
    dims: GSADims = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, dims.K)
    C = chunk_size
    rows, spans = padded_chunk_rows((q, k, v, s, g), dims, cu_seqlens, C, dt)
    if initial_state is None:
        hk = rows[0].new_zeros(dims.N, dims.H, dims.K, dims.M)
        hv = rows[0].new_zeros(dims.N, dims.H, dims.M, dims.V)
    else:
        hk, hv = initial_state[0].to(dt), initial_state[1].to(dt)
    o, hk, hv = _chunked(*rows, scale, hk, hv, C)
    o = _from_padded_rows(o, spans, dims.B, dims.T).to(q.dtype)
    return o, ((hk, hv) if output_final_state else None)
