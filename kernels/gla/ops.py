"""``chunk_gla`` and ``fused_recurrent_gla``: gated linear attention, the operator's public entries.

Which implementation runs: the chunked torch path (``chunked.py``) for training and prefill, on
every device, and the token loop (``reference.py``) for decoding. Our GSA Triton kernels are not reused
here: they fuse the slot softmax between GSA's two gated passes at every level (the output kernel
reads both states, the backward's prep and scans differentiate through the softmax), so none of them
computes one gated pass with its gradients on its own; only the forward state scan would fit (GLA's
state is GSA's slot-value state with the keys as write weights), and a forward without its backward
does not train. A Triton GLA kernel is future work (docs/mixers.md).
"""
from __future__ import annotations

from .chunked import chunk_gla_torch
from .reference import recurrent_gla_loop


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked gated linear attention for training and prefill.

    Args:
        q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log forget gates (<= 0)
           per key dimension. HQ must be a multiple of H.
        scale: output scale, default K ** -0.5.
        initial_state: optional state [N, H, K, V] (fp32).
        output_final_state: return the state after each sequence's last token.
        cu_seqlens: optional [N + 1] int offsets of N packed sequences (B must be 1).
    Returns:
        o [B, T, HQ, V] in the input dtype, and the fp32 final state [N, H, K, V] or None.
    """
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token gated linear attention for decoding a few new tokens; :func:`chunk_gla`'s contract."""
    o, final = recurrent_gla_loop(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), final
