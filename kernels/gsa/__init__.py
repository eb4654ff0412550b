"""Gated Slot Attention operators (the formulas: ``naive.py``; the arguments: ``dispatch.chunk_gsa``).

    from t2r.kernels.gsa import naive_recurrent_gsa, chunk_gsa, fused_recurrent_gsa

``chunk_gsa`` (training, prefill) and ``fused_recurrent_gsa`` (decoding) pick the Triton
kernels for CUDA tensors and the torch implementation otherwise; ``backend="torch"`` or
``backend="triton"`` (or the environment variable ``T2R_GSA_BACKEND``) forces one.
"""
from .dispatch import chunk_gsa, fused_recurrent_gsa, resolve_backend
from .naive import naive_recurrent_gsa
from .utils import GSAInputError

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "naive_recurrent_gsa", "resolve_backend", "GSAInputError"]
