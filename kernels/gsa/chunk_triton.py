"""Chunked GSA on Triton: training and prefill, forward and backward in one autograd.Function.

Kernels per call (chunk size C, one program per (chunk, kv head) unless said otherwise):

    forward   state snapshots (sequential over chunks per (sequence, kv head, tile); chunk_state_triton)
              fused pass 1 + softmax + pass 2 (chunk_fwd_triton)
    backward  prep: p, dY, R (chunk_bwd_triton)
              state-gradient scan (reverse, chunk_state_triton)
              dq, dk  |  dv, ds, dg (chunk_bwd_triton)

GQA is native: states live per kv head ([N, H, K, M] and [N, H, M, V]) and every kernel loops
over the G query heads of its group. Varlen batches (cu_seqlens) are handled by per-chunk tables.
"""
from __future__ import annotations

import torch

from .chunk_bwd_triton import backward_inputs, backward_prep
from .chunk_fwd_triton import forward_output
from .chunk_state_triton import backward_states, forward_states
from .common_triton import chunk_tables, prepare

# Tunables (the benchmark may override them): chunk size, warps per kernel family, and the dtype
# of the intermediates kept between kernels (state snapshots, their gradients, slot probabilities
# and logit gradients): "fp32", or "input" (bf16 for 16-bit inputs: half the bytes, about twice
# the rounding error in the gradients).
CONFIG = {"chunk": 64, "warps_state": 4, "warps_fwd": 4, "warps_bwd": 8, "stages": 2, "store": "fp32"}


class ChunkGSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, prep):
        C = CONFIG["chunk"]
        seq, chunks, n_snap, n_chunks = chunk_tables(prep, C)
        snap_k, snap_v, ht_k, ht_v = forward_states(prep, seq, n_snap, C, CONFIG["warps_state"], CONFIG["stages"])
        o = forward_output(prep, snap_k, snap_v, chunks, n_chunks, C, CONFIG["warps_fwd"], CONFIG["stages"])
        ctx.save_for_backward(snap_k, snap_v, seq, chunks)
        ctx.prep, ctx.n_snap, ctx.n_chunks, ctx.C = prep, n_snap, n_chunks, C
        ctx.has_h0 = hk0 is not None
        return o, ht_k, ht_v

    @staticmethod
    def backward(ctx, do, dht_k, dht_v):
        snap_k, snap_v, seq, chunks = ctx.saved_tensors
        p, C = ctx.prep, ctx.C
        do = do.contiguous()
        d = p.dims
        if dht_k is not None or dht_v is not None:
            dht_k = do.new_zeros(d.N, d.H, d.K, d.M, dtype=torch.float32) if dht_k is None else dht_k
            dht_v = do.new_zeros(d.N, d.H, d.M, d.V, dtype=torch.float32) if dht_v is None else dht_v
            dht_k, dht_v = dht_k.float().contiguous(), dht_v.float().contiguous()
        w, st = CONFIG["warps_bwd"], CONFIG["stages"]
        prob, dy, r = backward_prep(p, do, snap_k, snap_v, chunks, ctx.n_chunks, C, w, st)
        ds_k, ds_v, dh0_k, dh0_v = backward_states(p, p.q, do, dy, prob, dht_k, dht_v, seq, ctx.n_snap, C,
                                                   CONFIG["warps_state"], st)
        dq, dk, dv, ds, dg = backward_inputs(p, do, prob, dy, r, snap_k, snap_v, ds_k, ds_v, chunks,
                                             ctx.n_chunks, C, w, st)
        if not ctx.has_h0:
            dh0_k = dh0_v = None
        return dq, dk, dv, ds, dg, dh0_k, dh0_v, None


def chunk_gsa_triton(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked GSA (Triton). Same contract as :func:`t2r.kernels.gsa.chunk_gsa`.

    Returns o [B, T, HQ, V] in the input dtype and, if asked, the fp32 final states
    ([N, H, K, M], [N, H, M, V]); gradients flow to q, k, v, s, g, the initial states and
    through the final states.
    """
    prep = prepare(q, k, v, s, g, scale, initial_state, cu_seqlens, "chunk_gsa")
    if CONFIG["store"] == "fp32":
        prep.snap_dtype = prep.act_dtype = torch.float32
    hk0, hv0 = prep.hk0, prep.hv0
    o, ht_k, ht_v = ChunkGSAFunction.apply(prep.q, prep.k, prep.v, prep.s, prep.g, hk0, hv0, prep)
    return o, ((ht_k, ht_v) if output_final_state else None)
