"""What the GSA Triton entry points share: which inputs the kernels take, and the chunk tables.

Both ``chunk_gsa_triton`` and ``fused_recurrent_gsa_triton`` call :func:`prepare` after the
operator's shape contract (:func:`utils.check_inputs`); anything the kernels cannot take raises
:class:`GSAInputError` here rather than producing wrong numbers. Its result,
:class:`PreparedInputs`, is frozen; the chunked operator's backward rebuilds it from the tensors
its forward saved (:func:`prepared_inputs`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import MAX_DIM, GSADims, GSAInputError, check_inputs, default_scale, host_memo, sequence_spans

SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, eq=False)
class PreparedInputs:
    """The inputs as the Triton kernels take them, and how the kernels are compiled for them."""
    dims: GSADims
    q: torch.Tensor  # q, k, v, s, g contiguous
    k: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor
    scale: float
    hk0: torch.Tensor | None  # initial states, fp32 and contiguous
    hv0: torch.Tensor | None
    cu_seqlens: torch.Tensor | None  # on the inputs' device
    BK: int
    BV: int
    BM: int
    DT: object  # tl dtype of tensor-core operands
    PREC: str  # tl.dot input precision
    snap_dtype: torch.dtype  # dtype of per-chunk state snapshots (and their gradients)
    act_dtype: torch.dtype  # dtype of the logit gradients dY kept between backward kernels
    prob_dtype: torch.dtype  # dtype of the slot probabilities p kept between backward kernels

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def prepare(q, k, v, s, g, scale, initial_state, cu_seqlens, what: str) -> PreparedInputs:
    dims = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    if q.dtype not in SUPPORTED:
        raise GSAInputError(
            f"{what}: the Triton kernels take bfloat16, float16 or float32 inputs, got {q.dtype}; "
            f"use backend='torch' for other dtypes"
        )
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise GSAInputError(f"{what}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    for name, n in (("K (key dim)", dims.K), ("V (value dim)", dims.V), ("M (slots)", dims.M)):
        if n < 1 or n > MAX_DIM:
            raise GSAInputError(f"{what}: {name} = {n} is not supported by the Triton kernels (1..{MAX_DIM})")
    hk0 = hv0 = None
    if initial_state is not None:
        hk0, hv0 = initial_state
        for name, x in (("initial_state[0]", hk0), ("initial_state[1]", hv0)):
            if x.device != q.device:
                raise GSAInputError(f"{what}: {name} is on {x.device}, inputs are on {q.device}")
            if not x.dtype.is_floating_point or x.dtype == torch.float64:
                raise GSAInputError(f"{what}: {name} must be a float32 state, got {x.dtype}")
        hk0, hv0 = hk0.float().contiguous(), hv0.float().contiguous()
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        cu_seqlens = cu_seqlens.to(q.device)
    return prepared_inputs(q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(),
                           default_scale(scale, dims.K), hk0, hv0, cu_seqlens, dims)


def fp32_operands(q: torch.Tensor) -> bool:
    """Whether the kernels multiply fp32 (IEEE) operands: for fp32 inputs, and on CPU (the Triton
    interpreter multiplies bf16 tiles as raw integers in triton 3.9) whatever the input dtype."""
    return q.dtype == torch.float32 or not q.is_cuda


def prepared_inputs(q, k, v, s, g, scale: float, hk0, hv0, cu_seqlens,
                    dims: GSADims | None = None) -> PreparedInputs:
    """The PreparedInputs of inputs that :func:`prepare` has checked and made contiguous (the
    chunked operator's backward rebuilds its forward's from the saved tensors with this)."""
    if dims is None:
        B, T, HQ, K = q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        dims = GSADims(B=B, T=T, HQ=HQ, H=k.shape[2], K=K, V=v.shape[-1], M=s.shape[-1], N=N)
    fp32 = fp32_operands(q)
    return PreparedInputs(
        dims=dims, q=q, k=k, v=v, s=s, g=g, scale=scale, hk0=hk0, hv0=hv0, cu_seqlens=cu_seqlens,
        BK=block(dims.K), BV=block(dims.V), BM=block(dims.M),
        DT=tl.float32 if fp32 else tl.bfloat16, PREC="ieee" if fp32 else "tf32",
        snap_dtype=torch.float32 if q.dtype == torch.float32 else torch.bfloat16,
        act_dtype=torch.float32 if q.dtype == torch.float32 else torch.bfloat16,
        prob_dtype=torch.float32 if q.dtype == torch.float32 else torch.bfloat16,
    )


@dataclass(frozen=True, eq=False)
class ChunkTables:
    """Per-sequence and per-chunk int32 tables on the inputs' device, for chunks of C tokens.

    seq    [N, 3]: bos, eos (flattened token rows), offset of its first state snapshot
    chunks [NC, 3]: first token row, length (<= C), index of the snapshot entering the chunk
    bslot  [NC]: where the backward scan finds chunk j's own state-gradient contribution: entry
                 off + j - 1 for j >= 1, the sequence's spare last entry off + nchunks for j = 0
    Sequence n owns ceil(len / C) + 1 snapshots (the last one is its final state).
    """
    C: int
    seq: torch.Tensor
    chunks: torch.Tensor
    bslot: torch.Tensor
    n_snap: int  # snapshots of all sequences
    n_chunks: int  # NC


_TABLES: dict = {}


def chunk_tables(p: PreparedInputs, C: int) -> ChunkTables:
    """The :class:`ChunkTables` of the inputs: cached for equal-length batches, and built once per
    ``cu_seqlens`` tensor for packed ones (every layer of a step shares them)."""
    d = p.dims
    if p.varlen:
        return host_memo(p.cu_seqlens, ("chunk_tables", C, d.T, str(p.q.device)), lambda: _build_tables(p, C))
    key = (d.B, d.T, C, str(p.q.device))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = _build_tables(p, C)
    return _TABLES[key]


def _build_tables(p: PreparedInputs, C: int) -> ChunkTables:
    d = p.dims
    seq, chunk, bslot, off = [], [], [], 0
    for row, start, end in sequence_spans(d, p.cu_seqlens):
        bos, eos = row * d.T + start, row * d.T + end
        nc = -(-(eos - bos) // C)
        seq.append((bos, eos, off))
        chunk.extend((bos + j * C, min(C, eos - bos - j * C), off + j) for j in range(nc))
        bslot.extend(off + j - 1 if j else off + nc for j in range(nc))
        off += nc + 1
    seq_t = torch.tensor(seq, dtype=torch.int32).view(-1, 3).to(p.q.device)
    chunk_t = torch.tensor(chunk, dtype=torch.int32).view(-1, 3).to(p.q.device)
    bslot_t = torch.tensor(bslot, dtype=torch.int32).to(p.q.device)
    return ChunkTables(C=C, seq=seq_t, chunks=chunk_t, bslot=bslot_t, n_snap=off, n_chunks=len(chunk))
