"""``fused_recurrent_gsa``: token-by-token Gated Slot Attention (decoding), the public entry.

The Triton kernel (``_triton_fused_recurrent.py``) runs for CUDA tensors, the torch loop
(``naive.py``) otherwise; ``backend`` or ``$T2R_GSA_BACKEND`` forces one (``backend.py``).
"""
from __future__ import annotations

from .backend import resolve_backend
from .naive import recurrent_gsa_loop


def fused_recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, backend: str | None = None):
    """Recurrent (token by token) GSA for decoding a few new tokens per sequence.

    Same arguments and returns as :func:`chunk_gsa`; states are fp32 and one pair per kv head.
    """
    if resolve_backend(backend, q) == "triton":
        from ._triton_fused_recurrent import fused_recurrent_gsa_triton

        return fused_recurrent_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    o, final = recurrent_gsa_loop(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), final
