"""Gated Slot Attention operators (the formulas: ``naive.py``; the arguments: ``chunk.chunk_gsa``).

    from t2r.kernels.gsa import naive_recurrent_gsa, chunk_gsa, fused_recurrent_gsa

``chunk_gsa`` (training, prefill; ``chunk.py``) and ``fused_recurrent_gsa`` (decoding;
``fused_recurrent.py``) pick the Triton kernels for CUDA tensors and the torch implementation
otherwise; ``backend="torch"`` or ``backend="triton"`` (or the environment variable
``T2R_GSA_BACKEND``) forces one (``backend.py``).

Files: ``naive.py`` the fp32 reference loop, ``chunk_torch.py`` the chunked torch implementation,
``utils.py`` the shape contract every entry point checks, ``_triton_*.py`` the Triton internals
(kernels and their host wrappers: ``_triton_chunk.py`` the chunked operator's autograd Function,
``_triton_fused_recurrent.py`` the decoding kernel, ``_triton_inputs.py`` what the kernels take).
"""
from .backend import resolve_backend
from .chunk import chunk_gsa
from .fused_recurrent import fused_recurrent_gsa
from .naive import naive_recurrent_gsa
from .utils import GSAInputError

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "naive_recurrent_gsa", "resolve_backend", "GSAInputError"]
