"""``gsa_decode_step``: a GSA layer's decoding step from raw gate logits, fused on Triton.

What a converted layer does around the recurrence, in one call:

    g = logsigmoid(gate_logits) / tau,   s = 1 - exp(g)
    o, state = fused_recurrent_gsa(act(q), act(k), v_act(v), s, g, scale, state)
    o = RMSNorm(silu(o)) * norm_weight                      (with ``norm_weight``)

On CUDA (Triton) it is one kernel that also writes the state in place when ``out_state`` is the
state itself: at batch 1 a decoding step is a chain of small kernels, and this one replaces about
20 of them per layer (the gate math and its casts, the feature maps, the norm, the state copies).
On CPU (torch) it is the same composition of the operator and plain torch ops; both compute the
gates, maps and norm in fp32 and round once to q's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .naive import recurrent_gsa_loop
from .utils import GSAInputError, check_inputs, default_scale

# the elementwise feature maps / value activations the step applies (in the kernel on Triton)
ACTIVATIONS = {
    "identity": lambda x: x,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "elu1": lambda x: F.elu(x) + 1.0,
}
_CODES = {"identity": 0, "silu": 1, "swish": 1, "relu": 2, "elu1": 3}  # _triton_decode_step's constants


def _check(q, k, v, gate_logits, state, out_state, qk_act, v_act, norm_weight, tau):
    if not isinstance(gate_logits, torch.Tensor) or not gate_logits.dtype.is_floating_point:
        raise GSAInputError("gsa_decode_step: gate_logits must be a floating-point tensor [B, T, H, M]")
    if gate_logits.device != q.device:
        raise GSAInputError(f"gsa_decode_step: gate_logits are on {gate_logits.device}, q on {q.device}")
    lead = tuple(getattr(k, "shape", ()))[:3]
    if gate_logits.ndim != 4 or tuple(gate_logits.shape[:3]) != lead:
        raise GSAInputError(f"gsa_decode_step: gate_logits must be [B, T, H, M] with k's [B, T, H] = {lead}, "
                            f"got shape {tuple(gate_logits.shape)}")
    like = q.new_empty(1).expand(gate_logits.shape)  # the logits' shape in q's dtype (they may be fp32)
    dims = check_inputs(q, k, v, like, like, state)
    for name, act in (("qk_act", qk_act), ("v_act", v_act)):
        if act not in ACTIVATIONS:
            raise GSAInputError(f"gsa_decode_step: {name}={act!r} is not one of {', '.join(ACTIVATIONS)}")
    if not tau > 0:
        raise GSAInputError(f"gsa_decode_step: tau must be > 0, got {tau}")
    if norm_weight is not None and tuple(norm_weight.shape) != (dims.V,):
        raise GSAInputError(f"gsa_decode_step: norm_weight must have shape ({dims.V},) (the value dim), "
                            f"got {tuple(norm_weight.shape)}")
    if out_state is not None:
        want = ((dims.B, dims.H, dims.K, dims.M), (dims.B, dims.H, dims.M, dims.V))
        if len(out_state) != 2 or any(tuple(t.shape) != w or t.dtype != torch.float32 or not t.is_contiguous()
                                      for t, w in zip(out_state, want)):
            raise GSAInputError(f"gsa_decode_step: out_state must be two contiguous float32 tensors of shapes "
                                f"{want[0]} and {want[1]}")
    return dims


def gsa_decode_step(q, k, v, gate_logits, state=None, *, tau: float, scale: float | None = None,
                    qk_act: str = "identity", v_act: str = "identity", norm_weight: torch.Tensor | None = None,
                    norm_eps: float = 1e-6, out_state=None, backend: str | None = None):
    """A few new tokens (decoding) of a GSA layer, from gate logits to the normed output.

    q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] before their maps; ``gate_logits`` [B, T, H, M]
    (+inf at a token that must neither write nor decay the state); ``state`` (slot keys
    [B, H, K, M], slot values [B, H, M, V], fp32) or None for zeros. ``qk_act`` / ``v_act``: one of
    :data:`ACTIVATIONS`. ``out_state``: fp32 buffers for the final state (may be ``state`` itself:
    updated in place); None allocates them. Returns (o [B, T, HQ, V] in q's dtype, final state).
    No autograd: decoding only.
    """
    dims = _check(q, k, v, gate_logits, state, out_state, qk_act, v_act, norm_weight, tau)
    scale = default_scale(scale, dims.K)
    if resolve_backend(backend, q) == "triton":
        return _triton(q, k, v, gate_logits, state, out_state, tau, scale, qk_act, v_act, norm_weight, norm_eps, dims)
    return _torch(q, k, v, gate_logits, state, out_state, tau, scale, qk_act, v_act, norm_weight, norm_eps)


@torch.no_grad()
def _torch(q, k, v, x, state, out_state, tau, scale, qk_act, v_act, norm_weight, norm_eps):
    g = F.logsigmoid(x.float()) / tau
    s = -torch.expm1(g)
    qa, ka = (ACTIVATIONS[qk_act](t.float()) for t in (q, k))
    o, final = recurrent_gsa_loop(qa, ka, ACTIVATIONS[v_act](v.float()), s, g, scale, state, True,
                                  dtype=torch.float32)
    if norm_weight is not None:
        o = F.rms_norm(F.silu(o), o.shape[-1:], eps=norm_eps) * norm_weight.float()
    if out_state is not None:
        for buf, t in zip(out_state, final):
            buf.copy_(t)
        final = tuple(out_state)
    return o.to(q.dtype), final


@torch.no_grad()
def _triton(q, k, v, x, state, out_state, tau, scale, qk_act, v_act, norm_weight, norm_eps, dims):
    from ._triton_decode_step import _decode_step_kernel
    from ._triton_inputs import block

    if dims.K > 128 or dims.V > 128 or dims.M > 128:
        raise GSAInputError(f"gsa_decode_step: K, V and M must be at most 128 for the Triton kernel, "
                            f"got {dims.K}, {dims.V}, {dims.M}")
    dev = q.device
    if state is not None:
        state = tuple(t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in state)
    if out_state is None:
        out_state = (torch.empty(dims.B, dims.H, dims.K, dims.M, device=dev, dtype=torch.float32),
                     torch.empty(dims.B, dims.H, dims.M, dims.V, device=dev, dtype=torch.float32))
    o = torch.empty(dims.B, dims.T, dims.HQ, dims.V, device=dev, dtype=q.dtype)
    if dims.B * dims.T == 0:
        return o, tuple(out_state)
    h0 = state if state is not None else out_state
    w = norm_weight if norm_weight is not None else o
    _decode_step_kernel[(dims.B * dims.H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), x.contiguous(), h0[0], h0[1], out_state[0], out_state[1], o,
        w, dims.T, scale, float(tau), float(norm_eps), H=dims.H, G=dims.G, K=dims.K, V=dims.V, M=dims.M,
        BK=block(dims.K), BV=block(dims.V), BM=block(dims.M), QK_ACT=_CODES[qk_act], V_ACT=_CODES[v_act],
        NORM=norm_weight is not None, USE_H0=state is not None, num_warps=4 if dims.K * dims.V <= 4096 else 8)
    return o, tuple(out_state)
