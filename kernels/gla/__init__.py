"""Gated linear attention operators (the formulas: ``reference.py``; the arguments: ``ops.chunk_gla``).

    from t2r.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla

One operator serves both new mixers: GLA (a data-dependent gate per key dimension) and the plain
linear attention (a fixed decay per head, or none: g = 0). ``ops.py`` says which implementation
runs (fla's Triton kernels on CUDA when installed, else torch) and why.
"""
from .ops import chunk_gla, fused_recurrent_gla
from .reference import naive_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla"]
