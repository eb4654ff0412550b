"""Chunked GSA on Triton: training and prefill, forward and backward in one autograd.Function.

Kernels per call (chunk size C):

    forward   chunk-parallel state contributions, then a scan over chunks (_triton_chunk_state)
              fused pass 1 + softmax + pass 2 (_triton_chunk_fwd)
    backward  prep: p, dY, R (_triton_chunk_bwd)
              chunk-parallel state-gradient contributions and intra-chunk ds parts, then a reverse
              scan (_triton_chunk_state)
              dq, dk per key tile | dv per value tile; then ds, dg (_triton_chunk_bwd)

The first version (before 2026-11-28, removed; 1.85-2.7x slower for forward+backward on the H200,
docs/benchmarks.md) walked all chunks of a sequence in one program per state and gave all input
gradients from two kernels at full key/value width.

GQA is native: states live per kv head ([N, H, K, M] and [N, H, M, V]) and every kernel loops
over the G query heads of its group. Varlen batches (cu_seqlens) are handled by per-chunk tables.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._triton_chunk_bwd import backward_inputs_split, backward_prep
from ._triton_chunk_fwd import forward_output
from ._triton_chunk_state import backward_states_scan, forward_states_scan
from ._triton_inputs import chunk_tables, prepare

# Tunables (the benchmark may override them): chunk size; warps per kernel family; "stages": software
# pipelining stages, overridden per family by "stages_<kernel>" (state, fwd, prep, local, split);
# "store", the dtype of the intermediates kept between kernels:
#   "fp32"    everything fp32;
#   "states"  state snapshots and their gradients in the input's 16-bit dtype (every consumer rounds
#             them to the tensor-core dtype anyway), p and dY fp32;
#   "probs"   as "states", and p in fp16 (p is in [0, 1]: 11 bits, no range risk);
#   "input"   snapshots, p and dY in the input dtype (2% faster still, but dY in bf16 puts the dq error
#             at 1.3e-2 on the CPU tests, over their 1e-2 bound: measurement only);
#   "auto"    "probs" where the tensor cores take 16-bit operands (CUDA, 16-bit inputs), else "fp32";
# "tile": the key/value tile width of the input-gradient kernels; "spec": compile each loop over
# query heads once per gate regime (factored / pairwise). Defaults measured fastest on the H200
# (docs/benchmarks.md); chunk 32 was slower.
STORES = ("fp32", "states", "probs", "input")
CONFIG = {"chunk": 64, "warps_state": 4, "warps_fwd": 4, "warps_bwd": 8, "stages": 2, "store": "auto",
          "tile": 128, "warps_split": 8, "warps_local": 8, "warps_finish": 4,
          "spec": True, "stages_prep": 3, "stages_local": 3, "stages_split": 3}


def _stages(cfg, kernel):
    """Software-pipelining stages of one kernel family: CONFIG["stages_<kernel>"], else CONFIG["stages"]."""
    return cfg.get(f"stages_{kernel}", cfg["stages"])


def run_forward(p, C, cfg=None):
    """Forward kernels: (o, snapshots k/v, final states k/v, tables, per-chunk decays)."""
    cfg = cfg or CONFIG
    seq, chunks, bslot, n_snap, n_chunks = chunk_tables(p, C)
    snap_k, snap_v, ht_k, ht_v, dec = forward_states_scan(p, seq, chunks, n_snap, n_chunks, C, cfg["warps_state"],
                                                          _stages(cfg, "state"))
    o = forward_output(p, snap_k, snap_v, chunks, n_chunks, C, cfg["warps_fwd"], _stages(cfg, "fwd"), cfg["spec"])
    return o, snap_k, snap_v, ht_k, ht_v, (seq, chunks, bslot, n_snap, n_chunks), dec


def run_backward(p, C, do, snap_k, snap_v, dht_k, dht_v, tables, dec, cfg=None):
    """Backward kernels: dq, dk, dv, ds, dg, dh0_k, dh0_v."""
    cfg = cfg or CONFIG
    seq, chunks, bslot, n_snap, n_chunks = tables
    prob, dy, r = backward_prep(p, do, snap_k, snap_v, chunks, n_chunks, C, cfg["warps_bwd"], _stages(cfg, "prep"),
                                cfg["spec"])
    ds_k, ds_v, dh0_k, dh0_v, dsx = backward_states_scan(
        p, p.q, do, dy, prob, dht_k, dht_v, seq, chunks, bslot, dec, n_snap, n_chunks, C, cfg["warps_local"],
        _stages(cfg, "local"), ds=True, spec=cfg["spec"])
    grads = backward_inputs_split(p, do, prob, dy, r, dsx, snap_k, snap_v, ds_k, ds_v, chunks, n_chunks, C,
                                  cfg["tile"], cfg["warps_split"], _stages(cfg, "split"), cfg["warps_finish"],
                                  cfg["spec"])
    return (*grads, dh0_k, dh0_v)


class ChunkGSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, prep):
        C = CONFIG["chunk"]
        cfg = dict(CONFIG)
        o, snap_k, snap_v, ht_k, ht_v, tables, dec = run_forward(prep, C, cfg)
        ctx.save_for_backward(snap_k, snap_v, *tables[:3], dec)
        ctx.prep, ctx.n_snap, ctx.n_chunks, ctx.C, ctx.cfg = prep, tables[3], tables[4], C, cfg
        ctx.has_h0 = hk0 is not None
        return o, ht_k, ht_v

    @staticmethod
    def backward(ctx, do, dht_k, dht_v):
        snap_k, snap_v, seq, chunks, bslot, dec = ctx.saved_tensors
        p = ctx.prep
        do = do.contiguous()
        d = p.dims
        if dht_k is not None or dht_v is not None:
            dht_k = do.new_zeros(d.N, d.H, d.K, d.M, dtype=torch.float32) if dht_k is None else dht_k
            dht_v = do.new_zeros(d.N, d.H, d.M, d.V, dtype=torch.float32) if dht_v is None else dht_v
            dht_k, dht_v = dht_k.float().contiguous(), dht_v.float().contiguous()
        tables = (seq, chunks, bslot, ctx.n_snap, ctx.n_chunks)
        dq, dk, dv, ds, dg, dh0_k, dh0_v = run_backward(p, ctx.C, do, snap_k, snap_v, dht_k, dht_v, tables,
                                                        dec, ctx.cfg)
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
    store = CONFIG["store"]
    if store == "auto":  # 16-bit storage only where the tensor cores take 16-bit operands anyway
        store = "probs" if prep.DT != tl.float32 else "fp32"
    if store not in STORES:
        raise ValueError(f"CONFIG['store'] = {store!r}; choose from {STORES} or 'auto'")
    if store != "input":
        prep.act_dtype = torch.float32
    if store in ("fp32", "states"):
        prep.prob_dtype = torch.float32
    elif store == "probs" and prep.prob_dtype != torch.float32:
        prep.prob_dtype = torch.float16  # p is in [0, 1]: fp16 keeps 11 bits with no range risk
    if store == "fp32":
        prep.snap_dtype = torch.float32
    hk0, hv0 = prep.hk0, prep.hv0
    o, ht_k, ht_v = ChunkGSAFunction.apply(prep.q, prep.k, prep.v, prep.s, prep.g, hk0, hv0, prep)
    return o, ((ht_k, ht_v) if output_final_state else None)
