"""Convert a pretrained Llama/Mistral/Qwen2-family checkpoint into a GSA (or GLA, linear, hybrid) model.

The teacher's q/k/v/o projections, MLPs, norms and embeddings move into the converted model
as they are (the same tensors: never two full copies of the weights in memory); only what the
conversion options add to each converted layer is new (``T2RPreTrainedModel.gsa_new_modules``:
the ``f_proj`` gate, learnable feature maps, the ``g_norm`` output norm, the window mix).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from .dtypes import torch_dtype
from .errors import T2RError
from .hub import ModelSource, resolve_model
from .kernels.gsa.utils import MAX_DIM
from .layers.gsa import GatedSlotAttention
from .models import T2RConfig, T2RForCausalLM
from .models.modeling_t2r import gsa_new_module, keeps_fp32
from .options import ConversionOptions, parse_layers  # noqa: F401  (re-exported)
from .paths import check_out_dir, staged_folder

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def config_from_teacher(teacher_config, options: ConversionOptions, source: str | None = None) -> T2RConfig:
    """A T2RConfig describing the teacher's decoder plus the conversion options."""
    c = teacher_config
    family = c.model_type
    if family not in SUPPORTED_ARCHITECTURES:
        raise T2RError(
            f"architecture {family!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(and checkpoints of those families)"
        )
    L = c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    if family == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = None
    layer_types = list(getattr(c, "layer_types", None) or [])
    if not window:
        window, layer_types = None, ["full_attention"] * L
    elif len(layer_types) != L:
        layer_types = ["sliding_attention"] * L
    softmax = parse_layers(options.softmax_layers, L)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim > MAX_DIM and len(softmax) < L and options.mixer == "gsa":
        raise T2RError(f"head_dim {head_dim} is larger than GSA's GPU kernels hold ({MAX_DIM}); keep such a model's "
                       "layers softmax (--softmax-layers all) or convert a model with smaller heads")
    attention_bias = bool(getattr(c, "attention_bias", False))
    return T2RConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=L, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=getattr(c, "initializer_range", 0.02), rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_parameters=dict(c.rope_parameters),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        sliding_window=window, layer_types=layer_types,
        base_model_type=family, base_model_name_or_path=source,
        gsa_layers=[i for i in range(L) if i not in softmax],
        num_slots=options.num_slots, gate_logit_normalizer=options.gate_logit_normalizer,
        feature_map=options.feature_map, use_rope=options.use_rope, gsa_scale=options.gsa_scale,
        v_activation=options.v_activation, output_norm=options.output_norm, gate_source=options.gate_source,
        f_proj_init=options.f_proj_init, window_size=options.window_size, mixer=options.mixer,
        gate_rank=options.gate_rank, linear_decay=options.linear_decay,
    )


def new_parameter_names(model) -> list[str]:
    """Parameters a conversion adds (everything else comes from the teacher)."""
    return [n for n, _ in model.named_parameters() if gsa_new_module(n)]


def convert_model(teacher, options: ConversionOptions, source: str | None = None) -> T2RForCausalLM:
    """Build the converted model around the teacher's own tensors (moved, not copied)."""
    config = config_from_teacher(teacher.config, options, source)
    with torch.device("meta"):
        model = T2RForCausalLM(config)
    state = teacher.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    new = set(new_parameter_names(model))
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if set(missing) - new or unexpected:
        raise T2RError(
            f"the teacher's weights do not fit its config: missing {sorted(set(missing) - new)[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    ref = teacher.get_input_embeddings().weight
    for name in sorted(new):  # materialise (from meta), then each layer initialises its own
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        dtype = torch.float32 if keeps_fp32(name) else ref.dtype
        value = torch.empty(getattr(module, param_name).shape, device=ref.device, dtype=dtype)
        setattr(module, param_name, torch.nn.Parameter(value))
    gen = torch.Generator().manual_seed(options.seed)
    for layer in model.model.layers:
        if isinstance(layer.self_attn, GatedSlotAttention):
            layer.self_attn.init_new_parameters(gen, options.f_proj_init)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config = teacher.generation_config
    return model.eval()


@contextlib.contextmanager
def _gguf_bar_follows_transformers():
    """transformers draws its "Converting and de-quantizing GGUF tensors" bar with plain tqdm, out of reach of its
    own progress-bar switch; make it follow that switch (the t2r command turns transformers' bars off)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    plain = gguf_utils.tqdm
    gguf_utils.tqdm = lambda *args, **kw: plain(*args, **{**kw, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = plain


def load_teacher(source: ModelSource, dtype: str = "auto"):
    """The teacher model and its tokenizer through transformers (safetensors, or GGUF)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wanted = torch_dtype(dtype)  # None: as saved
    if source.path.startswith("tiny:"):
        from .tiny import tiny_teacher

        teacher, tokenizer = tiny_teacher(source.path.removeprefix("tiny:"))
        return (teacher if wanted is None else teacher.to(wanted)), tokenizer
    kwargs = {**source.load_kwargs(), "local_files_only": source.local}
    teacher_config = AutoConfig.from_pretrained(source.path, **kwargs)
    if teacher_config.model_type not in SUPPORTED_ARCHITECTURES:
        raise T2RError(
            f"{source.name}: architecture {teacher_config.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    weights = {} if source.gguf_file else {"use_safetensors": True}  # never a pickle (it can run code)
    try:
        with _gguf_bar_follows_transformers() if source.gguf_file else contextlib.nullcontext():
            teacher = AutoModelForCausalLM.from_pretrained(source.path, dtype=wanted or "auto", **weights, **kwargs)
    except OSError as e:
        if "safetensors" not in str(e):
            raise
        raise T2RError(f"{source.name} has no safetensors weights; t2r never loads pickled ones (.bin), which can "
                       "run arbitrary code. Convert it to safetensors where you trust it, or pick a checkpoint "
                       "that ships them") from None
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    return teacher, tokenizer


def describe(model: T2RForCausalLM, options: ConversionOptions) -> str:
    c = model.config
    new = new_parameter_names(model)
    count = sum(model.get_parameter(n).numel() for n in new)
    total = sum(p.numel() for p in model.parameters())
    softmax = [i for i in range(c.num_hidden_layers) if i not in c.gsa_layers]
    lines = [
        f"converted {len(c.gsa_layers)}/{c.num_hidden_layers} attention layers to {c.mixer.upper()}"
        + (f" (kept softmax: {softmax})" if softmax else ""),
        f"new parameters: {count:,} ({count / total:.3%} of {total:,}) in {len(new)} tensors "
        f"({', '.join(sorted({n.split('.self_attn.')[1].split('.')[0] for n in new})) or 'none'})",
        "options: " + ", ".join(f"{k}={v}" for k, v in options.model_dump().items()),
    ]
    return "\n".join(lines)


def convert(model_name: str, out_dir: str | Path, options: ConversionOptions | None = None,
            overwrite: bool = False, log=print) -> T2RForCausalLM:
    """``t2r convert``: resolve, load the teacher, convert, save (safetensors) with its tokenizer and the
    modeling code (``auto_map``: the folder loads by path without ``import t2r``)."""
    from .export.remote_code import make_loadable_by_path

    options = options or ConversionOptions()
    out = Path(out_dir).expanduser()
    check_out_dir(out, overwrite)
    start = time.time()
    source = resolve_model(model_name)
    teacher, tokenizer = load_teacher(source, options.dtype)
    model = convert_model(teacher, options, source=model_name)
    del teacher
    with staged_folder(out) as tmp:  # a killed convert leaves no half-written folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_loadable_by_path(tmp)
    log(describe(model, options))
    log(f"saved to {out} in {time.time() - start:.1f}s")
    return model
