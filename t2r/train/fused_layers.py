"""``model.fused_layers``: liger-kernel's fused RMSNorm and SwiGLU kernels in a finetune run's layers.

Each RMSNorm (the decoder's, the final one, GSA's per-head output norm) and each SiLU-gated MLP of the
run's models takes liger's one-kernel forward and backward instead of the torch ops (RMSNorm: one
kernel each way instead of a fused forward and an unfused backward; SwiGLU: one kernel each way
instead of silu, mul and three backward kernels, each a full pass over the [tokens, intermediate]
activations). Only the forward the modules call changes, on these module objects, for this run: the
weights, the saved folders and the exported code stay plain torch.

The values are those of the torch path up to rounding: liger's RMSNorm ("llama" casting) rounds the
normalised input to its dtype before the weight multiplies it, as transformers' LlamaRMSNorm does.
"""
from __future__ import annotations

import os
import types

import torch

from ..errors import T2RError
from ..layers.norm import RMSNorm
from ..models.modeling_t2r import MLP
from .liger import liger_imports

FUSED_LAYER_CHOICES = ("auto", "liger", "off")
SILU_NAMES = ("silu", "swish")


def liger_layer_functions():
    """(liger's RMSNorm and SiLU-mul autograd functions, None), or (None, the reason they do not import)."""
    return liger_imports("liger_kernel.ops.rms_norm.LigerRMSNormFunction", "liger_kernel.ops.swiglu.LigerSiLUMulFunction")


def resolve_fused_layers(choice: str, device, sharded: bool = False, compiled: bool = False) -> tuple[str, str]:
    """(the layers a run uses: 'liger' or 'off'; why, in words) for ``model.fused_layers``. Under FSDP
    (``sharded``) auto means off: the swap is not verified there. With compiled decoder layers
    (``compiled``, model.compile) auto means off too: the compiled layers fuse the norms and SwiGLU
    themselves, and liger's kernels inside them made SmolLM2's finetune slower (docs/benchmarks.md)."""
    device = torch.device(device)
    if choice not in FUSED_LAYER_CHOICES:
        raise T2RError(f"model.fused_layers must be one of {', '.join(FUSED_LAYER_CHOICES)}, got {choice!r}")
    if choice == "off":
        return "off", "model.fused_layers: off"
    if sharded:
        if choice == "liger":
            raise T2RError("model.fused_layers: liger is not supported under FSDP yet; set model.fused_layers: auto "
                           "or off (torch RMSNorm and SwiGLU)")
        return "off", "model.fused_layers: auto, under FSDP"
    if choice == "auto" and compiled:
        return "off", "model.fused_layers: auto, under model.compile (the compiled layers fuse them)"
    on_gpu = device.type == "cuda"
    if choice == "auto" and not on_gpu:
        return "off", "model.fused_layers: auto, not on CUDA"
    functions, why = liger_layer_functions()
    if choice == "auto":
        return ("liger", "model.fused_layers: auto, on CUDA with liger-kernel") if functions else \
            ("off", f"model.fused_layers: auto, liger-kernel does not import ({why})")
    if functions is None:
        raise T2RError(f"model.fused_layers is 'liger' but liger-kernel does not import ({why}); install it with "
                       "pip install 't2r[fused]' (or liger-kernel), or set model.fused_layers: off")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise T2RError(f"model.fused_layers is 'liger' but the run is on {device.type}: liger-kernel's Triton kernels "
                       "need a CUDA GPU; set model.fused_layers: auto (or off) off GPUs")
    return "liger", "model.fused_layers: liger"


def use_fused_layers(model: torch.nn.Module, norm_classes: tuple[type, ...] = (RMSNorm,),
                     mlp_classes: tuple[type, ...] = (MLP,)) -> dict[str, int]:
    """Point every RMSNorm and SiLU-gated MLP of ``model`` at liger's kernels; how many of each.
    ``norm_classes`` and ``mlp_classes``: the module classes to take (others with the same attributes,
    ``weight``/``variance_epsilon`` and ``gate_proj``/``up_proj``/``down_proj``/``act_fn``, e.g.
    transformers' Llama and Mistral ones, work too)."""
    from transformers.activations import ACT2FN

    functions, why = liger_layer_functions()
    if functions is None:
        raise T2RError(f"liger-kernel does not import ({why}); install it with pip install 't2r[fused]'")
    rms_norm, silu_mul = functions

    def liger_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        # offset 0 (y = w * x_hat), llama casting; in_place=False: the incoming gradient is the residual
        # stream's too, which liger's in-place backward would overwrite
        return rms_norm.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)

    def liger_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul.apply(self.gate_proj(x), self.up_proj(x)))

    silu_classes = tuple({torch.nn.SiLU, *(type(ACT2FN[name]) for name in SILU_NAMES)})
    counts = {"RMSNorm": 0, "SwiGLU": 0}
    for module in model.modules():
        if isinstance(module, norm_classes):
            module.forward = types.MethodType(liger_rms_norm, module)
            counts["RMSNorm"] += 1
        elif isinstance(module, mlp_classes) and isinstance(module.act_fn, silu_classes):
            module.forward = types.MethodType(liger_swiglu, module)
            counts["SwiGLU"] += 1
    return counts
