"""The conversion options (``t2r convert`` flags, the finetune config's ``model:``): pydantic only, no
torch, so that building the command line stays fast."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .conversion_limits import (FEATURE_MAPS, F_PROJ_INITS, GATE_SOURCES, LIMITS, LINEAR_DECAYS, MAX_DIM, MIXERS,
                                V_ACTIVATIONS)
from .dtypes import DTYPE_CHOICES
from .errors import T2RError


def _field(name: str, **kwargs):
    """The pydantic field of conversion option ``name``: its default and bounds from ``LIMITS``."""
    limit = LIMITS[name]
    return Field(limit.default, **limit.bounds, **kwargs)


class ConversionOptions(BaseModel):
    """Every choice of a conversion (``t2r convert`` flags and the finetune config's ``model:``)."""

    model_config = ConfigDict(extra="forbid")

    mixer: Literal[MIXERS] = _field(
        "mixer", description="what replaces softmax attention: gsa (gated slots), gla (gated linear attention, a "
        "learned forget gate per key dim) or linear (linear attention, fixed decay per head)")
    num_slots: int = _field("num_slots", description=f"memory slots per kv head (M; the GPU kernels hold up to "
                            f"{MAX_DIM})")
    gate_logit_normalizer: float = _field("gate_logit_normalizer",
                                          description="tau in g = logsigmoid(gate logits) / tau")
    feature_map: Literal[FEATURE_MAPS] = _field("feature_map")
    use_rope: bool = _field("use_rope", description="keep RoPE on q/k in GSA layers (the paper drops it)")
    gsa_scale: float | None = _field("gsa_scale", description="logit scale; default 1.0 with swish, head_dim^0.5 "
                                     "with softmax/hedgehog, else head_dim^-0.5 (gla, linear: head_dim^-0.5)")
    v_activation: Literal[V_ACTIVATIONS] = _field("v_activation")
    output_norm: bool = _field("output_norm", description="o_proj(RMSNorm(silu(o))) instead of o_proj(o) "
                          "(gla, linear: RMSNorm(o) per head)")
    gate_source: Literal[GATE_SOURCES] = _field(
        "gate_source", description="gate logits from a new f_proj, or pooled from the key projection (no new weights)")
    f_proj_init: Literal[F_PROJ_INITS] = _field(
        "f_proj_init", description="initialise f_proj from the key projection pooled to the slots, or at random")
    window_size: int = _field("window_size", description="exact softmax attention over the last W tokens "
                              "inside each GSA layer, GSA for older ones (0: pure GSA)")
    gate_rank: int = _field("gate_rank", description="gla: rank of the low-rank gate projection")
    linear_decay: Literal[LINEAR_DECAYS] = _field(
        "linear_decay", description="linear: RetNet's fixed decay 1 - 2^(-5-h) per kv head h, or none")
    softmax_layers: str | list[int] = Field(
        "none", description="layers kept as softmax attention: 'none', 'all', or indices like '0,8-11'")
    dtype: Literal[DTYPE_CHOICES] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _options_of_another_mixer(self):
        """An option given a value other than its default for a mixer it does not act on would be
        silently ignored (say num_slots with mixer gla): refuse it. (A T2RError passes pydantic
        unwrapped: one line, from the flags and from a config file alike.)"""
        unused = [name for name in sorted(self.model_fields_set)
                  if name in LIMITS and self.mixer not in LIMITS[name].mixers
                  and getattr(self, name) != LIMITS[name].default]
        if unused:
            given = ", ".join(f"{n}={getattr(self, n)!r} (--{n.replace('_', '-')})" for n in unused)
            owners = " / ".join(sorted({m for n in unused for m in LIMITS[n].mixers}))
            raise T2RError(f"{given}: only mixer {owners} uses {'it' if len(unused) == 1 else 'them'}, and the mixer "
                           f"is {self.mixer!r}; remove {'it' if len(unused) == 1 else 'them'} (or leave at the "
                           "default), or choose that mixer")
        return self


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
