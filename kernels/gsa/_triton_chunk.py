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
over the G query heads of its group. Varlen batches (cu_seqlens) are handled by per-chunk tables
(``_triton_inputs.ChunkTables``).

``ChunkGSAFunction`` saves every tensor its backward reads with ``ctx.save_for_backward`` (the
inputs, the state snapshots, the chunk decays and the tables) and keeps on ``ctx`` only the logit
scale, the tables' sizes and the frozen :class:`ChunkConfig` it ran with; the backward rebuilds
the forward's :class:`PreparedInputs` from those.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton.language as tl

from ._triton_chunk_bwd import backward_inputs_split, backward_prep
from ._triton_chunk_fwd import forward_output
from ._triton_chunk_state import backward_states_scan, forward_states_scan
from ._triton_inputs import ChunkTables, PreparedInputs, chunk_tables, prepare, prepared_inputs

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
# query heads once for factored chunks and once for the others (blocked or pairwise, told apart inside).
# Defaults measured fastest on the H200 (docs/benchmarks.md); chunk 32 was slower. "stages_prep" is 2:
# with "spec" (two copies of its loop) the prep kernel needs 270,336 bytes of shared memory at 3 stages
# at Mistral-7B's shapes, over Hopper's 232,448 (scripts/kernel_smem.py prints every kernel's need).
STORES = ("fp32", "states", "probs", "input")
CONFIG = {"chunk": 64, "warps_state": 4, "warps_fwd": 4, "warps_bwd": 8, "stages": 2, "store": "auto",
          "tile": 128, "warps_split": 8, "warps_local": 8, "warps_finish": 4,
          "spec": True, "stages_prep": 2, "stages_local": 3, "stages_split": 3}


@dataclass(frozen=True)
class ChunkConfig:
    """CONFIG as one call runs it: read when the call starts; its backward runs with the same."""
    chunk: int
    store: str  # one of STORES ("auto" resolved)
    tile: int
    spec: bool
    warps_state: int
    warps_fwd: int
    warps_bwd: int
    warps_local: int
    warps_split: int
    warps_finish: int
    stages_state: int  # software-pipelining stages per kernel family: CONFIG["stages_<family>"], else
    stages_fwd: int  # CONFIG["stages"]
    stages_prep: int
    stages_local: int
    stages_split: int

    @classmethod
    def resolve(cls, cfg: dict, DT) -> ChunkConfig:
        """``cfg`` (a CONFIG) for inputs whose tensor-core operands are ``DT``."""
        store = cfg["store"]
        if store == "auto":  # 16-bit storage only where the tensor cores take 16-bit operands anyway
            store = "probs" if DT != tl.float32 else "fp32"
        if store not in STORES:
            raise ValueError(f"CONFIG['store'] = {store!r}; choose from {STORES} or 'auto'")
        stages = {f"stages_{kernel}": cfg.get(f"stages_{kernel}", cfg["stages"])
                  for kernel in ("state", "fwd", "prep", "local", "split")}
        return cls(chunk=cfg["chunk"], store=store, tile=cfg["tile"], spec=cfg["spec"],
                   warps_state=cfg["warps_state"], warps_fwd=cfg["warps_fwd"], warps_bwd=cfg["warps_bwd"],
                   warps_local=cfg["warps_local"], warps_split=cfg["warps_split"],
                   warps_finish=cfg["warps_finish"], **stages)


def with_storage(p: PreparedInputs, store: str) -> PreparedInputs:
    """``p`` with the dtypes of the intermediates that storage mode ``store`` (one of STORES) keeps."""
    act, prob, snap = p.act_dtype, p.prob_dtype, p.snap_dtype
    if store != "input":
        act = torch.float32
    if store in ("fp32", "states"):
        prob = torch.float32
    elif store == "probs" and prob != torch.float32:
        prob = torch.float16  # p is in [0, 1]: fp16 keeps 11 bits with no range risk
    if store == "fp32":
        snap = torch.float32
    return replace(p, act_dtype=act, prob_dtype=prob, snap_dtype=snap)


def run_forward(p: PreparedInputs, tables: ChunkTables, cfg: ChunkConfig):
    """Forward kernels: (o, snapshots k/v, final states k/v, per-chunk decays)."""
    snap_k, snap_v, ht_k, ht_v, dec = forward_states_scan(p, tables, num_warps=cfg.warps_state,
                                                          num_stages=cfg.stages_state)
    o = forward_output(p, snap_k, snap_v, tables, num_warps=cfg.warps_fwd, num_stages=cfg.stages_fwd,
                       spec=cfg.spec)
    return o, snap_k, snap_v, ht_k, ht_v, dec


def run_backward(p: PreparedInputs, tables: ChunkTables, cfg: ChunkConfig, do, snap_k, snap_v, dht_k, dht_v, dec):
    """Backward kernels: dq, dk, dv, ds, dg, dh0_k, dh0_v."""
    prob, dy, r = backward_prep(p, do, snap_k, snap_v, tables, num_warps=cfg.warps_bwd, num_stages=cfg.stages_prep,
                                spec=cfg.spec)
    ds_k, ds_v, dh0_k, dh0_v, dsx = backward_states_scan(
        p, do, dy, prob, dht_k, dht_v, tables, dec, num_warps=cfg.warps_local, num_stages=cfg.stages_local,
        ds=True, spec=cfg.spec)
    grads = backward_inputs_split(p, do, prob, dy, r, dsx, snap_k, snap_v, ds_k, ds_v, tables, tile=cfg.tile,
                                  num_warps=cfg.warps_split, num_stages=cfg.stages_split,
                                  warps_finish=cfg.warps_finish, spec=cfg.spec)
    return (*grads, dh0_k, dh0_v)


class ChunkGSAFunction(torch.autograd.Function):
    """The chunked kernels' forward and backward: tensors through save_for_backward, only scalars
    and the frozen ChunkConfig on ctx (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, prep: PreparedInputs, cfg: ChunkConfig):
        # prep holds q, k, v, s, g, hk0, hv0 themselves (the tensors autograd sees as inputs)
        tables = chunk_tables(prep, cfg.chunk)
        o, snap_k, snap_v, ht_k, ht_v, dec = run_forward(prep, tables, cfg)
        ctx.save_for_backward(q, k, v, s, g, hk0, hv0, prep.cu_seqlens, snap_k, snap_v, dec, tables.seq,
                              tables.chunks, tables.bslot)
        ctx.scale, ctx.n_snap, ctx.n_chunks, ctx.cfg = prep.scale, tables.n_snap, tables.n_chunks, cfg
        return o, ht_k, ht_v

    @staticmethod
    def backward(ctx, do, dht_k, dht_v):
        q, k, v, s, g, hk0, hv0, cu_seqlens, snap_k, snap_v, dec, seq, chunks, bslot = ctx.saved_tensors
        cfg = ctx.cfg
        p = with_storage(prepared_inputs(q, k, v, s, g, ctx.scale, hk0, hv0, cu_seqlens), cfg.store)
        tables = ChunkTables(C=cfg.chunk, seq=seq, chunks=chunks, bslot=bslot, n_snap=ctx.n_snap,
                             n_chunks=ctx.n_chunks)
        do = do.contiguous()
        d = p.dims
        if dht_k is not None or dht_v is not None:
            dht_k = do.new_zeros(d.N, d.H, d.K, d.M, dtype=torch.float32) if dht_k is None else dht_k
            dht_v = do.new_zeros(d.N, d.H, d.M, d.V, dtype=torch.float32) if dht_v is None else dht_v
            dht_k, dht_v = dht_k.float().contiguous(), dht_v.float().contiguous()
        dq, dk, dv, ds, dg, dh0_k, dh0_v = run_backward(p, tables, cfg, do, snap_k, snap_v, dht_k, dht_v, dec)
        if hk0 is None:
            dh0_k = dh0_v = None
        return dq, dk, dv, ds, dg, dh0_k, dh0_v, None, None


def chunk_gsa_triton(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked GSA (Triton). Same contract as :func:`t2r.kernels.gsa.chunk_gsa`.

    Returns o [B, T, HQ, V] in the input dtype and, if asked, the fp32 final states
    ([N, H, K, M], [N, H, M, V]); gradients flow to q, k, v, s, g, the initial states and
    through the final states.
    """
    prep = prepare(q, k, v, s, g, scale, initial_state, cu_seqlens, "chunk_gsa")
    cfg = ChunkConfig.resolve(CONFIG, prep.DT)
    prep = with_storage(prep, cfg.store)
    o, ht_k, ht_v = ChunkGSAFunction.apply(prep.q, prep.k, prep.v, prep.s, prep.g, prep.hk0, prep.hv0, prep, cfg)
    return o, ((ht_k, ht_v) if output_final_state else None)
