"""What each stage trains and the loss it sums: attention transfer and (LoRA) finetuning."""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import T2RError
from ..models.modeling_t2r import T2RPreTrainedModel, causal_lm_loss, gsa_new_module, next_token_targets
from .config import AttentionTransferStage, FinetuneStage, LoraConfig, ModelConfig
from .losses import kl_sum, next_token_losses
from .profiling import phase


def gsa_modules_present(model) -> list[str]:
    """The new GSA modules this model has that hold parameters (what LoRA runs save in full)."""
    present = {gsa_new_module(n) for n, _ in model.named_parameters()}
    return [m for m in T2RPreTrainedModel.gsa_new_modules if m in present]


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
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


@contextlib.contextmanager
def lora_input_casts_off(model):
    """Under autocast, keep peft's LoRA layers from casting their input to the adapters' fp32.

    peft casts a layer's input to its adapter weights' dtype (fp32 here: trained parameters are
    fp32), and autocast casts it straight back to bf16/fp16 for the matmul: two full copies of the
    activations per LoRA layer, forward and backward, that change no value (the round trip through
    fp32 is exact). Without autocast (fp32 runs) nothing changes."""
    layers = [] if not torch.is_autocast_enabled(_autocast_device(model)) else \
        [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.cast_input_dtype_enabled = b


def _autocast_device(model) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _is_gsa_param(name: str) -> bool:
    return gsa_new_module(name) is not None and ".original_module." not in name


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
        no_gsa = getattr(getattr(model, "config", None), "gsa_layers", None) == []
        if isinstance(stage, AttentionTransferStage) and not no_gsa:
            raise T2RError("stage attention_transfer has nothing to train: this conversion adds no parameters "
                           "(gate_source: key, or mixer: linear, with a fixed feature map, no output norm and no "
                           "window); drop that stage, or use a learnable feature map (linear, hedgehog), "
                           "gate_source: f_proj or an output norm")
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


def causal_lm(model):
    """The T2RForCausalLM inside whatever wraps it (DDP, peft)."""
    core = model.module if hasattr(model, "module") and not hasattr(model, "get_base_model") else model
    return core.get_base_model() if hasattr(core, "get_base_model") else core


def final_hidden(model, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """(the final hidden states [B, T, D] that ``lm_head`` takes, ``lm_head``) of one forward of
    ``model`` (through its wrappers, so DDP and FSDP see an ordinary forward), without the full
    logits: the forward projects only the last position (``logits_to_keep=1``) and a hook on the
    decoder stack keeps its output."""
    core = causal_lm(model)
    kept = []
    handle = core.model.register_forward_hook(lambda module, args, out: kept.append(out[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return kept[-1], core.get_output_embeddings()


def stage_loss_sum(model, batch: dict, stage, teacher=None, fused: str = "off",
                   chunk_size: int = 1024, compiled: bool = False) -> tuple[torch.Tensor, dict]:
    """Sum of the stage's per-token losses over the batch, and its parts (for logging). The KL
    term's teacher is ``teacher`` (run as softmax attention) or, with LoRA, the model's own weights
    with adapters off. ``fused`` ('off', 'chunked' or 'liger', see t2r.train.losses): 'off' takes
    the losses from the full fp32 logits; the others from the final hidden states, a chunk of tokens
    at a time (the same values); ``compiled``: 'chunked' compiles its chunks."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(stage, AttentionTransferStage):
        with phase("forward"):
            loss = model(**inputs, attention_transfer=True).loss
        return loss, {"transfer_mse": loss.detach()}
    target = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    with_kl = stage.kl_weight > 0

    def teacher_context():
        return teacher.teacher_mode() if teacher is not None else teacher_weights(model)

    if fused == "off":
        with phase("forward"):
            logits = model(**inputs, use_cache=False).logits.float()
        if with_kl:
            with torch.no_grad(), teacher_context(), phase("teacher_forward"):
                teacher_logits = (teacher or model)(**inputs, use_cache=False).logits.float()
        with phase("losses"):
            ce = causal_lm_loss(logits, batch["labels"], batch.get("cu_seqlens"), reduction="sum")
            if with_kl:
                valid = (target != -100).reshape(-1)
                vocab = logits.shape[-1]
                kl = kl_sum(logits.reshape(-1, vocab)[valid], teacher_logits.reshape(-1, vocab)[valid],
                            stage.kl_temperature)
            loss = ce if not with_kl else ce + stage.kl_weight * kl
    else:
        with phase("forward"):
            hidden, head = final_hidden(model, inputs)
        teacher_hidden = teacher_head = None
        if with_kl:
            # the teacher's lm_head is applied after its forward, outside teacher_context: neither
            # teacher mode nor disabled adapters touch it (LoRA never wraps lm_head)
            with torch.no_grad(), teacher_context(), phase("teacher_forward"):
                teacher_hidden, teacher_head = final_hidden(teacher or model, inputs)
        with phase("losses"):
            loss, ce, kl = next_token_losses(hidden, head, target, teacher_hidden, teacher_head,
                                             stage.kl_temperature, stage.kl_weight, how=fused, chunk_size=chunk_size,
                                             compiled=compiled)
    return loss, ({"ce": ce.detach(), "kl": kl.detach()} if with_kl else {"ce": ce.detach()})
