"""``chunk_gla`` and ``fused_recurrent_gla``: gated linear attention, the operator's public entries.

Which implementation runs (``backend``, GSA's setting: ``kernels/gsa/backend.py``): on CUDA with fla
installed ('auto'), fla's Triton GLA kernels (``fla_kernels.py``); otherwise the chunked torch path
(``chunked.py``) for training and prefill and the token loop (``reference.py``) for decoding.

Why fla's kernels and not ours: our GSA Triton kernels fuse the slot softmax between GSA's two gated
passes at every level (the output kernel reads both states, the backward's prep and scans
differentiate through the softmax), so none of them computes one gated pass with its gradients on its
own. fla's ``chunk_gla`` is exactly this operator (a gate per key dimension, time-first layout,
varlen, fp32 states), maintained and tuned on Hopper; only GQA is missing (``fla_kernels.py``
repeats the kv heads).
"""
from __future__ import annotations

from .chunked import chunk_gla_torch
from .fla_kernels import FLA, chunk_gla_fla, fused_recurrent_gla_fla
from .reference import recurrent_gla_loop
from ..gsa.backend import resolve_backend


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              backend: str | None = None):
    """Chunked gated linear attention for training and prefill.

    Args:
        q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log forget gates (<= 0)
           per key dimension. HQ must be a multiple of H.
        scale: output scale, default K ** -0.5.
        initial_state: optional state [N, H, K, V] (fp32).
        output_final_state: return the state after each sequence's last token.
        cu_seqlens: optional [N + 1] int offsets of N packed sequences (B must be 1).
        backend: 'auto' (default: fla's Triton kernels on CUDA when fla is installed), 'torch' or 'triton'.
    Returns:
        o [B, T, HQ, V] in the input dtype, and the fp32 final state [N, H, K, V] or None.
    """
    if resolve_backend(backend, q, needs=FLA) == "triton":
        return chunk_gla_fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        backend: str | None = None):
    """Token-by-token gated linear attention for decoding a few new tokens; :func:`chunk_gla`'s contract."""
    if resolve_backend(backend, q, needs=FLA) == "triton":
        return fused_recurrent_gla_fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    o, final = recurrent_gla_loop(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), final
