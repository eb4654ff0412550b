"""Public entry points: choose the Triton kernels or the torch implementation."""
from __future__ import annotations

import os

import torch

from .chunk_torch import chunk_gsa_torch
from .naive import recurrent_gsa_loop
from .utils import GSAInputError

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """'torch' or 'triton' for a call on tensor ``x``.

    ``backend`` None means ``$T2R_GSA_BACKEND`` or 'auto'; 'auto' takes Triton on CUDA.
    Forcing 'triton' on CPU tensors needs ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = backend or os.environ.get("T2R_GSA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise GSAInputError(f"unknown GSA backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise GSAInputError("backend='triton' needs the triton package: pip install triton")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise GSAInputError(
                "backend='triton' got CPU tensors; move them to CUDA, or set TRITON_INTERPRET=1 "
                "to run the kernels in the Triton interpreter"
            )
    return choice


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
        from .chunk_triton import chunk_gsa_triton

        return chunk_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gsa_torch(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, backend: str | None = None):
    """Recurrent (token by token) GSA for decoding a few new tokens per sequence.

    Same arguments and returns as :func:`chunk_gsa`; states are fp32 and one pair per kv head.
    """
    if resolve_backend(backend, q) == "triton":
        from .recurrent_triton import fused_recurrent_gsa_triton

        return fused_recurrent_gsa_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    o, final = recurrent_gsa_loop(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), final
