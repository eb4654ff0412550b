"""Precision and sharding policy of a finetune run: which dtype each parameter trains and is saved
in, and what FSDP needs that a single process or DDP does not.

- Trained parameters are fp32 whatever the weights' dtype (and under FSDP every parameter: it gathers
  and reduces each layer as one group of one dtype); accelerate's mixed precision computes in bf16/fp16.
- Saved weights go back to the weights' dtype; the output norms and window mix stay fp32.
- FSDP fixes which parameters take gradients when it first gathers them: every parameter some stage
  trains keeps ``requires_grad``, and the gradients of those the current stage does not train are dropped.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..dtypes import short_name
from ..errors import T2RError
from ..models.modeling_t2r import keeps_fp32
from .config import AttentionTransferStage, RunConfig
from .stages import set_trainable, stage_parameters

HALF = (torch.bfloat16, torch.float16)


def weights_dtype_name(config: RunConfig) -> str:
    """The dtype the model's weights will have: the conversion's, or a converted folder's."""
    folder_config = Path(config.model.source).expanduser() / "config.json"
    if folder_config.is_file():
        saved = json.loads(folder_config.read_text())
        return short_name(saved.get("dtype") or saved.get("torch_dtype"))
    return config.model.conversion.dtype


def mixed_precision(config: RunConfig) -> str:
    """accelerate's mixed_precision. auto: bf16 on GPUs that have it, else the weights' own half
    dtype (frozen half weights meet fp32 trainable ones only under autocast), else fp32."""
    choice = config.precision
    if choice == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return {"bf16": "bf16", "fp16": "fp16"}.get(weights_dtype_name(config), "no")
    return {"fp32": "no"}.get(choice, choice)


def check_fsdp_has_cuda() -> None:
    """An accelerate config that asks for FSDP (``accelerate launch`` sets ACCELERATE_USE_FSDP) on a machine
    without CUDA would not shard: accelerate quietly runs its processes as DDP over gloo. Say so instead."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise T2RError("the accelerate config asks for FSDP (distributed_type: FSDP), which runs on CUDA GPUs, "
                       "and this machine has none; on CPUs launch with a DDP config "
                       "(configs/accelerate/cpu-2proc.yaml: processes joined over gloo) or without accelerate")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


class Precision:
    """The policy for one run: built with the accelerator, told the model before it is prepared."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sharded = is_fsdp(accelerator)
        self.weights_dtype: torch.dtype | None = None  # what OUTPUT/model is saved in
        self._stage_params: set[str] | None = None

    def prepare_parameters(self, model, stages) -> None:
        """Whatever any stage trains is trainable when wrapped (DDP registers it) and fp32 whatever the
        base dtype (under FSDP, every parameter fp32); each stage then freezes what it does not train."""
        trained = set().union(*(set_trainable(model, stage) for stage in stages))
        self.weights_dtype = model.get_input_embeddings().weight.dtype
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
            if (name in trained or self.sharded) and p.dtype in HALF:
                p.data = p.data.float()

    def enter_stage(self, model, stage) -> None:
        """Train only this stage's parameters: freeze the others, or under FSDP (which fixes
        ``requires_grad`` when it first gathers) remember them, and drop the others' gradients."""
        core = self.accelerator.unwrap_model(model)
        if self.sharded:
            self._stage_params = set(stage_parameters(core, stage))
        else:
            set_trainable(core, stage)

    def drop_untrained_grads(self, model) -> None:
        """Under FSDP, forget the gradients of the parameters this stage does not train."""
        if not self.sharded:
            return
        for name, p in self.accelerator.unwrap_model(model).named_parameters():
            if name not in self._stage_params:
                p.grad = None

    def backward_scope(self, model, stage):
        """Context around a stage's forwards and backwards: for attention transfer, the layers kept
        gathered through backward (``unsharded_through_backward``); else nothing."""
        if isinstance(stage, AttentionTransferStage):
            return self.unsharded_through_backward(model)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unsharded_through_backward(self, model):
        """FSDP2 reshards a layer after its forward and gathers it again from a hook on the layer's
        outputs in backward. In attention transfer no layer output carries a gradient (each layer
        passes the teacher's hidden states on; the loss is gathered beside them), so that hook never
        fires: keep the layers gathered until FSDP's end-of-backward callback reduces their
        gradients and reshards them. No effect without FSDP2.

        Each module is set alone (``recurse=False``). The root (the first FSDP module) is left as FSDP2
        keeps it, gathered after its forward: set back to the config's ``True`` it would free ``lm_head``
        after the forward, under the losses that apply it there (``loss.fused: chunked``)."""
        mods = [m for m in model.modules() if hasattr(m, "set_reshard_after_forward")]
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        restore = bool(getattr(plugin, "reshard_after_forward", True))
        for m in mods[1:]:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in mods[1:]:
                m.set_reshard_after_forward(restore, recurse=False)

    def full_state_dict(self, model):
        """Under FSDP, the whole model's state dict, gathered on the main process (every process
        must call this); otherwise None."""
        return self.accelerator.get_state_dict(model) if self.sharded else None

    def in_weights_dtype(self, full: dict) -> dict:
        """A gathered (fp32) state dict back in the weights' dtype; the output norms stay fp32."""
        return {k: v if keeps_fp32(k) or not v.is_floating_point() else v.to(self.weights_dtype)
                for k, v in full.items()}

    def cast_back(self, model) -> None:
        """The (unwrapped) model's parameters back in the weights' dtype; the output norms stay fp32."""
        for name, p in model.named_parameters():
            if not keeps_fp32(name) and p.dtype != self.weights_dtype:
                p.data = p.data.to(self.weights_dtype)
