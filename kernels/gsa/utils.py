"""Input checks and layout helpers shared by every GSA implementation.

One place for the operator's shape contract (``chunk.chunk_gsa`` documents it): every entry point
calls :func:`check_inputs` first, so a bad call fails with the same clear message whichever
backend would have run it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ...errors import T2RError

MAX_DIM = 128  # the Triton kernels' limit on K, V and M: larger ones do not fit the register tiles


class GSAInputError(ValueError, T2RError):
    """An operator was called with inputs that break its contract (the ``t2r`` command prints it as one line)."""


@dataclass(frozen=True)
class GSADims:
    B: int  # batch (1 with cu_seqlens)
    T: int  # tokens per row
    HQ: int  # query heads
    H: int  # kv heads (one state pair each)
    K: int  # key / query dim
    V: int  # value dim
    M: int  # memory slots
    N: int  # sequences: B, or len(cu_seqlens) - 1

    @property
    def G(self) -> int:
        """Query heads per kv head (the GQA group size)."""
        return self.HQ // self.H


def _shape(name: str, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise GSAInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise GSAInputError(
            f"{name} must have {ndim} dims (sequence-first [B, T, heads, dim]), got shape {tuple(x.shape)}"
        )


def check_inputs(q, k, v, s, g, initial_state=None, cu_seqlens=None) -> GSADims:
    """Validate the operator's arguments and return their dimensions.

    q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], s and g [B, T, H, M];
    initial_state ([N, H, K, M], [N, H, M, V]); cu_seqlens [N + 1] int, with B == 1.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("s", s), ("g", g)):
        _shape(name, x, 4)
    B, T, HQ, K = q.shape
    H = k.shape[2]
    V, M = v.shape[-1], s.shape[-1]
    expect = {"k": (B, T, H, K), "v": (B, T, H, V), "s": (B, T, H, M), "g": (B, T, H, M)}
    for name, x in (("k", k), ("v", v), ("s", s), ("g", g)):
        if tuple(x.shape) != expect[name]:
            raise GSAInputError(
                f"{name} has shape {tuple(x.shape)}, expected {expect[name]} to match q {tuple(q.shape)} "
                f"(k/v/s/g share [B, T, H]; s and g share the slot dim M)"
            )
    if H == 0 or HQ % H != 0:
        raise GSAInputError(
            f"query heads HQ={HQ} must be a positive multiple of kv heads H={H} (GQA groups of HQ // H)"
        )
    dtypes = {x.dtype for x in (q, k, v, s, g)}
    if len(dtypes) != 1:
        raise GSAInputError(f"q, k, v, s, g must share one dtype, got {sorted(str(d) for d in dtypes)}")
    if not q.dtype.is_floating_point:
        raise GSAInputError(f"inputs must be floating point, got {q.dtype}")
    devices = {x.device for x in (q, k, v, s, g)}
    if len(devices) != 1:
        raise GSAInputError(f"q, k, v, s, g must be on one device, got {sorted(str(d) for d in devices)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise GSAInputError(f"with cu_seqlens the batch must be packed into B=1, got B={B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise GSAInputError(
                f"cu_seqlens must be a 1-D integer tensor [N + 1] of sequence offsets, got "
                f"shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
            )
        bounds = sequence_bounds(cu_seqlens)
        if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise GSAInputError(f"cu_seqlens must start at 0, never decrease and end at T={T}; got {list(bounds)}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise GSAInputError("initial_state must be a pair (slot keys [N, H, K, M], slot values [N, H, M, V])")
        hk, hv = initial_state
        if tuple(hk.shape) != (N, H, K, M) or tuple(hv.shape) != (N, H, M, V):
            raise GSAInputError(
                f"initial_state shapes {tuple(hk.shape)}, {tuple(hv.shape)} do not match "
                f"([N, H, K, M], [N, H, M, V]) = ({(N, H, K, M)}, {(N, H, M, V)})"
            )
    return GSADims(B=B, T=T, HQ=HQ, H=H, K=K, V=V, M=M, N=N)


def default_scale(scale, K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gates, softmax and states run in fp32 (fp64 when the inputs are fp64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_spans(dims: GSADims, cu_seqlens) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sequence, in state order."""
    if cu_seqlens is None:
        return [(b, 0, dims.T) for b in range(dims.B)]
    bounds = sequence_bounds(cu_seqlens)
    return [(0, bounds[n], bounds[n + 1]) for n in range(dims.N)]


# Host-side values derived from a device tensor, per tensor object: {id: (weakref, version, {what: value})}
_HOST_MEMO: dict[int, tuple] = {}


def host_memo(t: torch.Tensor, what, make):
    """``make()``, computed once per tensor object, in-place version and ``what``.

    For what the host derives from a device tensor's values (each read waits for the GPU to finish
    everything queued): a packed batch's ``cu_seqlens`` reaches every layer of a step, forward and
    checkpoint recompute, and reading it in each would stall the host once a layer. An in-place change
    of the tensor recomputes; inference tensors (no version counter) are never memoised."""
    try:
        version = t._version
    except RuntimeError:
        return make()
    key = id(t)
    entry = _HOST_MEMO.get(key)
    if entry is None or entry[0]() is not t or entry[1] != version:
        entry = (weakref.ref(t, lambda _, key=key: _HOST_MEMO.pop(key, None)), version, {})
        _HOST_MEMO[key] = entry
    memo = entry[2]
    if what not in memo:
        memo[what] = make()
    return memo[what]


def sequence_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """The offsets of ``cu_seqlens`` as host integers, read from the device once per tensor (:func:`host_memo`)."""
    return host_memo(cu_seqlens, "bounds", lambda: tuple(cu_seqlens.tolist()))


# The chunked Triton kernels' gate regimes per (row, chunk, kv head) block (_triton_intra.chunk_gates, which
# takes these numbers): the largest |cumulative log gate| from a chunk's (a sub-block's) middle row for which
# the factored (blocked) form is used, the rows per sub-block, and the regimes' codes.
THRESH = 40.0
SUB = 16
FACTORED, BLOCKED, PAIRWISE = 0, 1, 2
REGIME_NAMES = ("factored", "blocked", "pairwise")


def chunk_regimes(g: torch.Tensor, chunk: int = 64, thresh: float = THRESH, sub: int = SUB) -> torch.Tensor:
    """How the chunked Triton kernels evaluate each (row, chunk, kv head) block of log gates g [B, T, H, M]
    (``_triton_intra.chunk_gates``): FACTORED when every |b - r| <= thresh, b the cumulative log gate from
    the chunk start and r its value at the chunk's middle row; else BLOCKED when that holds in every
    sub-block of ``sub`` rows with r at the sub-block's middle row (chunks longer than ``sub``); else
    PAIRWISE. A last, partial chunk is padded with g = 0 as the kernels load it. Returns int64 [B, chunks, H]."""
    B, T, H, M = g.shape
    n = -(-T // chunk)
    padded = torch.zeros(B, n * chunk, H, M, dtype=torch.float32, device=g.device)
    padded[:, :T] = g.float()
    b = padded.view(B, n, chunk, H, M).cumsum(2)
    factored = (b - b[:, :, chunk // 2 - 1: chunk // 2]).abs().amax(dim=(2, 4)) <= thresh
    out = torch.full(factored.shape, PAIRWISE, dtype=torch.int64, device=g.device)
    if chunk > sub:
        bs = b.view(B, n, chunk // sub, sub, H, M)
        blocked = (bs - bs[:, :, :, sub // 2 - 1: sub // 2]).abs().amax(dim=(2, 3, 5)) <= thresh
        out[blocked] = BLOCKED
    out[factored] = FACTORED
    return out
