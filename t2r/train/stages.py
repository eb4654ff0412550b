"""What each stage trains and the loss it sums: attention transfer and (LoRA) finetuning."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..hub import T2RError
from ..models.modeling_t2r import T2RPreTrainedModel, next_token_targets
from .config import AttentionTransferStage, FinetuneStage, LoraConfig, ModelConfig

GSA_MODULES = T2RPreTrainedModel.gsa_new_modules


def gsa_modules_present(model) -> list[str]:
    """The new GSA modules this model has that hold parameters (what LoRA runs save in full)."""
    present = {n.split(".self_attn.")[1].split(".")[0] for n, _ in model.named_parameters() if ".self_attn." in n}
    return [m for m in GSA_MODULES if m in present]


def load_model(cfg: ModelConfig, log=print):
    """(converted model, tokenizer): an already converted model (a t2r folder, or its Hub id) as it is,
    or any supported checkpoint converted in memory with ``cfg.conversion``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..convert import convert_model, describe, load_teacher
    from ..hub import converted_folder, resolve_model

    folder = converted_folder(cfg.source)
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        log(f"loaded converted model {cfg.source} (model.conversion is ignored for converted models)")
        return model, AutoTokenizer.from_pretrained(folder)
    teacher, tokenizer = load_teacher(resolve_model(cfg.source), cfg.conversion.dtype)
    model = convert_model(teacher, cfg.conversion, source=cfg.source)
    log(describe(model, cfg.conversion))
    return model, tokenizer


def run_lora_config(stages) -> LoraConfig | None:
    """The one LoRA config of the run's finetune stages (adapters are added once, before training)."""
    loras = {s.lora.model_dump_json() if s.lora else None for s in stages if isinstance(s, FinetuneStage)}
    if len(loras) > 1:
        raise T2RError("all finetune stages must use the same lora settings (or all lora: null)")
    lora = next(iter(loras), None)
    return LoraConfig.model_validate_json(lora) if lora else None


def add_lora(model, lora: LoraConfig):
    """Wrap with peft: LoRA on ``target_modules``; the new GSA modules train in full and are saved
    with the adapter (``modules_to_save``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise T2RError(f"lora.target_modules {missing} are not modules of this model "
                       "(use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, modules_to_save=gsa_modules_present(model),
                                 task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def _is_gsa_param(name: str) -> bool:
    return any(f".{m}." in name for m in GSA_MODULES) and ".original_module." not in name


def stage_parameters(model, stage) -> list[str]:
    """Names of the parameters this stage trains."""
    lora = isinstance(stage, FinetuneStage) and stage.lora is not None
    names = []
    for name, _ in model.named_parameters():
        if isinstance(stage, AttentionTransferStage):
            train = _is_gsa_param(name)
        elif lora:
            train = _is_gsa_param(name) or "lora_" in name
        else:
            train = ".original_module." not in name
        if train:
            names.append(name)
    if not names:
        if isinstance(stage, AttentionTransferStage) and any(".self_attn.q_proj." in n for n, _ in
                                                             model.named_parameters()):
            raise T2RError("stage attention_transfer has nothing to train: this conversion adds no parameters "
                           "(gate_source: key with a fixed feature map and no window); drop that stage, or "
                           "use a learnable feature map (linear, hedgehog) or gate_source: f_proj")
        raise T2RError(f"stage {stage.name} has nothing to train: the model has no GSA layers "
                       "(model.conversion.softmax_layers keeps every layer softmax)")
    return names


def set_trainable(model, stage) -> list[str]:
    """Mark this stage's parameters trainable (everything else frozen); return their names."""
    names = set(stage_parameters(model, stage))
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return sorted(names)


def count_targets(batch: dict, stage) -> torch.Tensor:
    """Tokens the stage's loss sums over (the normaliser of the mean)."""
    labels = batch["labels"]
    if isinstance(stage, AttentionTransferStage):
        return (labels != -100).sum()
    return (next_token_targets(labels, batch.get("cu_seqlens")) != -100).sum()


def teacher_weights(model):
    """Context: the same weights as the teacher (adapters off, GSA layers as softmax)."""
    stack = contextlib.ExitStack()
    core = model.module if hasattr(model, "module") and not hasattr(model, "get_base_model") else model
    if hasattr(core, "disable_adapter"):
        stack.enter_context(core.disable_adapter())
    base = core.get_base_model() if hasattr(core, "get_base_model") else core
    stack.enter_context(base.teacher_mode())
    return stack


def frozen_teacher(model):
    """A frozen copy of the converted model before training, run as the teacher: a full finetune
    (no adapters to switch off) changes the shared weights, and the KL target must not move."""
    import copy

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def stage_loss_sum(model, batch: dict, stage, teacher=None) -> tuple[torch.Tensor, dict]:
    """Sum of the stage's per-token losses over the batch, and its parts (for logging). The KL
    term's teacher is ``teacher`` (run as softmax attention) or, with LoRA, the model's own weights
    with adapters off."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(stage, AttentionTransferStage):
        loss = model(**inputs, attention_transfer=True).loss
        return loss, {"transfer_mse": loss.detach()}
    out = model(**inputs, use_cache=False)
    target = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    logits = out.logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                         reduction="sum")
    parts = {"ce": ce.detach()}
    loss = ce
    if stage.kl_weight > 0:
        with torch.no_grad(), (teacher.teacher_mode() if teacher is not None else teacher_weights(model)):
            teacher_logits = (teacher or model)(**inputs, use_cache=False).logits.float()
        t = stage.kl_temperature
        valid = (target != -100).reshape(-1)
        log_p = F.log_softmax(teacher_logits.reshape(-1, logits.shape[-1])[valid] / t, -1)
        log_q = F.log_softmax(logits.reshape(-1, logits.shape[-1])[valid] / t, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum() * t * t
        parts["kl"] = kl.detach()
        loss = loss + stage.kl_weight * kl
    return loss, parts
