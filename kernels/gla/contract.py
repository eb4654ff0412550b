"""The gated linear attention operator's shape contract (``ops.chunk_gla`` documents it).

It is GSA's contract (``kernels/gsa/utils.py``) with the keys in the place of the slot write
weights (one gate per key dimension: g has k's shape) and a single state [N, H, K, V].
"""
from __future__ import annotations

from ..gsa.utils import GSADims, GSAInputError, check_inputs


def check_gla_inputs(q, k, v, g, initial_state=None, cu_seqlens=None) -> GSADims:
    """Validate q [B, T, HQ, K], k and g [B, T, H, K], v [B, T, H, V], initial_state [N, H, K, V]
    and cu_seqlens; return the dimensions (M == K)."""
    dims = check_inputs(q, k, v, k, g, None, cu_seqlens)
    if initial_state is not None:
        want = (dims.N, dims.H, dims.K, dims.V)
        if not hasattr(initial_state, "shape") or tuple(initial_state.shape) != want:
            got = tuple(initial_state.shape) if hasattr(initial_state, "shape") else type(initial_state).__name__
            raise GSAInputError(f"initial_state must be one state [N, H, K, V] = {want}, got {got}")
    return dims
