"""``chunk_gsa``: chunked Gated Slot Attention (training, prefill), the operator's public entry.

The Triton kernels (``_triton_chunk.py``) run for CUDA tensors, the torch implementation
(``chunk_torch.py``) otherwise; ``backend`` or ``$T2R_GSA_BACKEND`` forces one (``backend.py``).
"""
from __future__ import annotations

from .backend import resolve_backend
from .chunk_torch import chunk_gsa_torch


def chunk_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, backend: str | None = None):
    """Chunked Gated Slot Attention for training and prefill.

    Args:
        q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V]; s, g: [B, T, H, M]
           (write weights and log forget gates <= 0). HQ must be a multiple of H.
        scale: logit scale, default K ** -0.5.
        initial_state: optional fp32 (slot keys [N, H, K, M], slot values [N, H, M, V]).
        output_final_state: return the state after each sequence's last token.
        cu_seqlens: optional [N + 1] int offsets of N packed sequences (B must be 1).
        backend: 'auto' (default), 'torch' or 'triton'.
    Returns:
        o [B, T, HQ, V] in the input dtype, and final_state (fp32 pair) or None.
    """
    if resolve_backend(backend, q) == "triton":
        from ._triton_chunk import chunk_gsa_triton

        return chunk_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gsa_torch(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
