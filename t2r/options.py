"""The conversion options (``t2r convert`` flags, the finetune config's ``model:``): pydantic only, no
torch, so that building the command line stays fast."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import T2RError

# kernels.gsa.utils.MAX_DIM (the Triton kernels' limit on K, V and M), repeated here so that building the CLI's
# parser (which reads these fields) imports no torch; tests/test_cli_help.py checks the two agree
MAX_DIM = 128


class ConversionOptions(BaseModel):
    """Every choice of a conversion (``t2r convert`` flags and the finetune config's ``model:``)."""

    model_config = ConfigDict(extra="forbid")

    num_slots: int = Field(64, ge=1, le=MAX_DIM, description=f"memory slots per kv head (M; the GPU kernels "
                           f"hold up to {MAX_DIM})")
    gate_logit_normalizer: float = Field(8.0, gt=0, description="tau in g = logsigmoid(gate logits) / tau")
    feature_map: Literal["swish", "relu", "identity", "elu1", "softmax", "linear", "hedgehog"] = "swish"
    use_rope: bool = Field(False, description="keep RoPE on q/k in GSA layers (the paper drops it)")
    gsa_scale: float | None = Field(None, gt=0, description="logit scale; default 1.0 with swish, head_dim^0.5 "
                                    "with softmax/hedgehog, else head_dim^-0.5")
    v_activation: Literal["silu", "identity"] = "silu"
    output_norm: bool = Field(True, description="o_proj(RMSNorm(silu(o))) instead of o_proj(o)")
    gate_source: Literal["f_proj", "key"] = Field(
        "f_proj", description="gate logits from a new f_proj, or pooled from the key projection (no new weights)")
    f_proj_init: Literal["key", "random"] = Field(
        "key", description="initialise f_proj from the key projection pooled to the slots, or at random")
    window_size: int = Field(0, ge=0, le=4096, description="exact softmax attention over the last W tokens "
                             "inside each GSA layer, GSA for older ones (0: pure GSA)")
    softmax_layers: str | list[int] = Field(
        "none", description="layers kept as softmax attention: 'none', 'all', or indices like '0,8-11'")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """'none' | 'all' | '0,3,8-11' (or a list of ints) -> sorted layer indices."""
    if isinstance(spec, list):
        picked = set(spec)
    elif spec.strip().lower() in ("", "none"):
        picked = set()
    elif spec.strip().lower() == "all":
        picked = set(range(num_layers))
    else:
        picked = set()
        for part in spec.split(","):
            try:
                lo, _, hi = part.strip().partition("-")
                picked.update(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise T2RError(f"bad layer list {spec!r}: use 'none', 'all' or indices like '0,8-11'") from None
    bad = sorted(i for i in picked if not 0 <= i < num_layers)
    if bad:
        raise T2RError(f"layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
    return sorted(picked)
