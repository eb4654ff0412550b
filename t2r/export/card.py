"""The model card (README.md) of an export: what the model is, how it was made, how well it does
against its teacher, how to load it with and without t2r, and the base model's license. A card is
written to be published: other local paths (a teacher folder, a corpus file) appear by their last part
only; the export's own folder is named in the usage lines until it is pushed, when they name the repo."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..hub import ALIAS_LICENSES, ALIASES, HUB_ID, public_name
from .card_eval import eval_table, model_index

TAGS = ["t2r", "gated-slot-attention", "linear-attention", "recurrent", "transformer-to-rnn"]
# the GGUF behind the 'smollm2-135m' alias is a quantization of this checkpoint
GGUF_ORIGINS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


@dataclass
class CardInfo:
    config: dict  # config.json of the model (adapter exports: of the base it goes on)
    fmt: str  # "model" | "adapter"
    location: str  # what users pass to from_pretrained: the Hub id, or the local folder
    dtype: str
    summary: dict | None = None  # run_summary.json of the run, if any
    source_kind: str = "converted"
    source_name: str = ""
    merged_lora: bool = False
    license: str | None = None  # overrides the run's
    modeling_files: list[str] = field(default_factory=list)
    lora: dict | None = None  # adapter exports: r, lora_alpha, target_modules, modules_to_save
    base_location: str | None = None  # adapter exports: where the converted base is
    t2r_version: str = ""
    eval_results: dict | None = None  # the JSON of `t2r eval --out` (export --eval-results)


def hub_base_model(name: str | None) -> str | None:
    """The Hub id of a teacher named by alias or id; None for local paths and tiny test models."""
    if not name:
        return None
    if name.lower() in GGUF_ORIGINS:
        return GGUF_ORIGINS[name.lower()]
    target = ALIASES.get(name.lower(), name)
    local = target.startswith((".", "/", "~")) or Path(target).expanduser().exists()
    return target if HUB_ID.match(target) and not local else None


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts) or "none"


def _kib(n: float) -> str:
    return f"{n / 2**10:,.0f} KiB" if n >= 2**10 else f"{n:,.0f} B"


def _num(x) -> str:
    if x is None:
        return "not measured"
    return f"{x:,.2f}" if isinstance(x, float) else f"{x:,}"


def teacher_name(info: CardInfo) -> str | None:
    """The model this one was made from, named as others can read it (never a path of this machine)."""
    return public_name((info.summary or {}).get("base_model") or info.config.get("base_model_name_or_path"))


def license_of(info: CardInfo) -> str | None:
    """--license, else the run's record, else what t2r knows of the teacher's alias."""
    teacher = teacher_name(info) or ""
    return info.license or (info.summary or {}).get("license") or ALIAS_LICENSES.get(teacher.lower())


def front_matter(info: CardInfo) -> str:
    teacher = teacher_name(info)
    meta: dict = {}
    license_ = license_of(info)
    if license_:
        license_ = str(license_).strip()
        if LICENSE_ID.match(license_.lower()):
            meta["license"] = license_.lower()
        else:
            meta.update(license="other", license_name=re.sub(r"[^a-z0-9]+", "-", license_.lower()).strip("-"))
    base = hub_base_model(teacher)
    if info.fmt == "adapter" and info.base_location and HUB_ID.match(info.base_location):
        base = info.base_location  # the converted model the adapter goes on, where it is on the Hub
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if info.fmt == "adapter" else "finetune"
    meta["tags"] = TAGS + (["lora", "peft"] if info.fmt == "adapter" else [])
    meta["library_name"] = "peft" if info.fmt == "adapter" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    if info.eval_results:
        meta["model-index"] = model_index(_title(info.location), info.eval_results)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


MIXER_NAMES = {"gsa": "**Gated Slot Attention** (GSA)", "gla": "**Gated Linear Attention** (GLA)",
               "linear": "**linear attention** (SUPRA-style, a fixed decay per head)"}


def _about(info: CardInfo) -> list[str]:
    c = info.config
    hub_id = hub_base_model(teacher_name(info))
    teacher = teacher_name(info) or "a pretrained model"
    named = f"`{teacher}`" + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id and hub_id != teacher else "")
    L, gsa = c["num_hidden_layers"], list(c.get("gsa_layers") or [])
    softmax = [i for i in range(L) if i not in gsa]
    from ..models import T2RConfig

    H, M, D = c["num_key_value_heads"], c["num_slots"], c["head_dim"]
    mixer = c.get("mixer", "gsa")
    state = len(gsa) * T2RConfig.from_dict(c).state_floats_per_layer() * 4
    window = c.get("window_size") or 0
    if window:  # the ring buffer of the last W tokens: k, v (teacher's and the mixer's), s, g
        gates = 2 * M if mixer == "gsa" else D + 1
        state += len(gsa) * window * H * (4 * D + gates) * {"float32": 4}.get(info.dtype, 2)
    kv_bytes = {"float32": 4}.get(info.dtype, 2)
    kv_token = 2 * H * D * kv_bytes
    what = "A LoRA adapter for a" if info.fmt == "adapter" else "A"
    short = {"gsa": "GSA", "gla": "GLA"}.get(mixer, "linear attention")
    lines = [
        f"{what} {named} ({c.get('base_model_type', 'llama')} family) converted from softmax attention to "
        f"{MIXER_NAMES[mixer]}, a linear-time recurrent layer with a fixed-size state, with "
        f"t2r {info.t2r_version} (Transformer-to-RNN finetuning). {len(gsa)} of its {L} attention layers are {short}"
        + (f"; {'layers' if len(softmax) > 1 else 'layer'} {layer_ranges(softmax)} "
           f"{'keep' if len(softmax) > 1 else 'keeps'} the teacher's softmax attention (a hybrid)." if softmax else "."),
        "",
        f"Decoding memory: the {short} layers carry a recurrent state of {_kib(state)} per sequence whatever the context "
        "length" + (f" (slots, and a ring buffer of the last {window} tokens)" if window else "") + (f", plus a KV cache of {_kib(len(softmax) * kv_token)} per token for the softmax layers"
                    if softmax else "")
        + f"; the teacher's KV cache takes {_kib(L * kv_token)} per token ({info.dtype}).",
    ]
    if info.source_kind == "checkpoint":
        lines += ["", f"This is the intermediate checkpoint `{info.source_name}` of a finetuning run; the training "
                  "and evaluation figures below describe the run's final model."]
    return lines


def _conversion(info: CardInfo) -> list[str]:
    from ..models import T2RConfig

    c = info.config
    cfg = T2RConfig.from_dict(c)  # what the model reads: the config's defaults filled in, its logit scale
    window = c.get("window_size") or 0
    mixer = c.get("mixer", "gsa")
    rows = [
        ("teacher", f"`{teacher_name(info)}` ({c.get('base_model_type')})"),
        ("mixer", {"gsa": "gsa", "gla": f"gla (low-rank gate, rank {c.get('gate_rank', 16)})",
                   "linear": f"linear (decay: {c.get('linear_decay', 'retnet')})"}[c.get("mixer", "gsa")]),
        ("GSA layers", f"{layer_ranges(c.get('gsa_layers') or [])} ({len(c.get('gsa_layers') or [])} of "
                       f"{c['num_hidden_layers']})"),
        ("memory slots per kv head", c["num_slots"]),
        ("gate logit normalizer (tau)", c["gate_logit_normalizer"]),
        ("feature map on q, k", c["feature_map"]),
        ("value activation", c["v_activation"]),
        ("RoPE in GSA layers", "kept" if c.get("use_rope") else "dropped"),
        ("logit scale", f"{cfg.gsa_logit_scale:g}"),
        ("output norm", "o_proj(RMSNorm(silu(o))), norm weights in fp32" if c.get("output_norm") else "none"),
        ("gate logits", "pooled from the key projection" if cfg.gate_source == "key"
         else "f_proj (initialised from the key projection)" if c.get("f_proj_init") == "key" else "f_proj"),
        ("window", f"exact softmax over the last {window} tokens + {mixer.upper()} for older ones" if window else "none"),
        ("heads / kv heads / head dim", f"{c['num_attention_heads']} / {c['num_key_value_heads']} / {c['head_dim']}"),
        ("weights dtype", info.dtype),
    ]
    if mixer != "gsa":  # GSA's slots and slot gates; the other mixers' gate is the mixer row
        rows = [r for r in rows if r[0] not in ("memory slots per kv head", "gate logits")]
        if mixer == "linear":
            rows = [r for r in rows if r[0] != "gate logit normalizer (tau)"]
    conv = (info.summary or {}).get("conversion") or {}
    if "seed" in conv:
        rows.append(("gate init seed", conv["seed"]))
    return ["## Conversion", "", "| option | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _training(info: CardInfo) -> list[str]:
    s = info.summary
    if not s:
        return ["## Training", "", "None recorded: this is the converted model as t2r made it (the new gate and norm "
                "weights are freshly initialized), before any finetuning. Expect it to need finetuning "
                "(`t2r finetune`) before use."]
    lines = ["## Training", "", f"Tokens seen: **{_num(s.get('tokens_seen'))}**.", "",
             "| stage | steps | tokens | LoRA |", "|---|---|---|---|"]
    for st in s.get("stages") or []:
        lora = st.get("lora")
        lora_text = "no" if not lora else ", ".join(
            f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in lora.items())
        lines.append(f"| {st.get('name')} | {_num(st.get('steps'))} | {_num(st.get('tokens'))} | {lora_text} |")
    if info.merged_lora:
        lines += ["", "The LoRA adapter is merged into the weights: this is a plain full model."]
    return lines


def _evaluation(info: CardInfo) -> list[str]:
    lines = ["## Evaluation", ""]
    ev = (info.summary or {}).get("eval") or {}
    if any(ev.get(k) is not None for k in ("teacher_ppl", "converted_ppl_before", "ppl_after")):
        teacher, after = ev.get("teacher_ppl"), ev.get("ppl_after")
        ratio = f" ({after / teacher:.2f}x the teacher's)" if teacher and after else ""
        tokens = f" on {_num(ev.get('eval_tokens'))} held-out tokens" if ev.get("eval_tokens") else ""
        lines += [f"Perplexity{tokens} (lower is better):", "",
                  "| model | perplexity |", "|---|---|",
                  f"| teacher (softmax attention) | {_num(teacher)} |",
                  f"| converted, before finetuning | {_num(ev.get('converted_ppl_before'))} |",
                  f"| **this model** | **{_num(after)}**{ratio} |"]
    elif not info.eval_results:
        lines.append("No held-out perplexity was recorded for this model.")
    if info.eval_results:
        lines += ([""] if len(lines) > 2 else []) + eval_table(info.eval_results)
    return lines


def _usage_model(info: CardInfo) -> list[str]:
    loc = info.location
    gen = ('inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
           "out = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
           "print(tokenizer.decode(out[0], skip_special_tokens=True))")
    kernels = ("on a CUDA GPU with `triton` installed the GSA layers run t2r's Triton kernels"
               if info.config.get("mixer", "gsa") == "gsa" else
               "on a CUDA GPU with fla installed (`pip install flash-linear-attention`) its layers run fla's Triton "
               "GLA kernels")
    return [
        "## Usage", "",
        "Without t2r: the modeling code ships in this repository (generated from t2r's sources), so "
        f"`trust_remote_code=True` runs it. It needs only `torch` and `transformers`; {kernels}, elsewhere a "
        "torch implementation.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{loc}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{loc}", trust_remote_code=True)', gen, "```", "",
        "With t2r installed, `import t2r` registers the model type and no remote code runs:", "",
        "```python", "import t2r  # registers the t2r model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{loc}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{loc}")', gen, "```", "",
        f"or from the command line: `t2r generate {loc} --prompt \"...\"`.",
        "Generation carries each GSA layer's fixed-size state instead of a growing KV cache.",
    ]


def _usage_adapter(info: CardInfo) -> list[str]:
    base, loc = info.base_location or "BASE", info.location
    lora = info.lora or {}
    return [
        "## Usage", "",
        f"The adapter goes on the **converted** model (not the original teacher): `{base}`. Export that base with "
        "`t2r export RUN/base --out BASE_DIR` (and push it) if it is only on the machine that trained it.", "",
        "```python", "import t2r  # or load the base with trust_remote_code=True if it is a t2r export",
        "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{loc}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{loc}")', "```", "",
        f"LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, on "
        f"{', '.join(sorted(lora.get('target_modules') or []))}; trained copies of "
        f"{', '.join(lora.get('modules_to_save') or []) or 'no other modules'} are saved in full.",
    ]


def _files(info: CardInfo) -> list[str]:
    if info.fmt == "adapter":
        return []
    names = ", ".join(f"`{n}`" for n in info.modeling_files)
    return ["## Files", "", "`model*.safetensors` (weights; safetensors only), `config.json` (with `auto_map` for "
            f"remote code), the tokenizer, `generation_config.json`, `t2r_export.json` (what was exported) and the "
            f"modeling code, generated by `t2r export` from t2r's sources: {names}."]


def _license(info: CardInfo) -> list[str]:
    license_, teacher = license_of(info), teacher_name(info)
    if license_:
        return ["## License", "", f"`{license_}`, carried over from the base model `{teacher}`: its terms apply to "
                "this derivative."]
    return ["## License", "", f"Not recorded. This model derives from `{teacher}`: check that model's license "
            "before using or sharing it, and add it here (`t2r export ... --license ID`)."]


def _title(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def relocate_card(card: str, old: str, new: str) -> str:
    """The card of an export written for ``old`` (its local folder, or another repo) now pushed to ``new``:
    the title, and what users pass to from_pretrained and t2r generate, name ``new``."""
    card = card.replace(f'"{old}"', f'"{new}"').replace(f"`t2r generate {old} ", f"`t2r generate {new} ")
    return card.replace(f"\n# {_title(old)}\n", f"\n# {_title(new)}\n", 1)


def model_card(info: CardInfo) -> str:
    sections = [[f"# {_title(info.location)}", ""] + _about(info), _conversion(info), _training(info),
                _evaluation(info),
                _usage_adapter(info) if info.fmt == "adapter" else _usage_model(info), _files(info), _license(info)]
    return front_matter(info) + "\n" + "\n\n".join("\n".join(s) for s in sections if s) + "\n"
