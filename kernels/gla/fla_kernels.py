"""The gla operator on fla's Triton kernels (flash-linear-attention, the maintained package).

fla's ``chunk_gla`` (training, prefill) and ``fused_recurrent_gla`` (decoding) take our layout
(time-first [B, T, H, K], states [N, H, K, V] in fp32, packed rows by ``cu_seqlens``) but one kv head
per query head: with GQA, k, v, g and the initial state are repeated to the query heads here
(autograd sums their gradients back) and the final state is read from one query head of each
group (all of a group's copies are the same state). Why fla's and not ours: ``ops.py``.
"""
from __future__ import annotations

import torch

from .contract import check_gla_inputs
from ..gsa.utils import GSAInputError, default_scale

FLA = ("fla", 'pip install "t2r[fla]"')  # the module the Triton backend imports, and its install hint


def _fla_ops():
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
    except ImportError as e:
        raise GSAInputError(f"the gla Triton backend runs fla's kernels, which failed to import ({e}); "
                            f"{FLA[1]}, or choose backend 'torch'") from None
    return chunk_gla, fused_recurrent_gla


def _run(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    dims = check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise GSAInputError(f"fla's GLA kernels take bfloat16, float16 or float32, got {q.dtype}; "
                            "use backend='torch' for other dtypes")
    G = dims.G
    if G > 1:
        k, v, g = (x.repeat_interleave(G, dim=2) for x in (k, v, g))
        if initial_state is not None:
            initial_state = initial_state.repeat_interleave(G, dim=1)
    o, final = op(q, k, v, g, scale=default_scale(scale, dims.K),
                  initial_state=None if initial_state is None else initial_state.float(),
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if final is not None and G > 1:
        final = final[:, ::G]
    return o, final


def chunk_gla_fla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """``ops.chunk_gla``'s contract on fla's chunked kernels."""
    return _run(_fla_ops()[0], q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla_fla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """``ops.fused_recurrent_gla``'s contract on fla's token-by-token kernel."""
    return _run(_fla_ops()[1], q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
