"""T2RConfig: a Llama/Mistral/Qwen2-family decoder whose attention layers may be Gated Slot Attention."""
from __future__ import annotations

from transformers import PretrainedConfig

from t2r.conversion_limits import LIMITS
from t2r.kernels.gsa.backend import BACKENDS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


class T2RConfig(PretrainedConfig):
    r"""Configuration of a converted (Transformer-to-RNN) model.

    The first block of fields describes the teacher decoder (copied from its config at
    conversion). ``gsa_layers`` lists the layers whose softmax attention was replaced by Gated
    Slot Attention; every other layer keeps softmax attention (a hybrid). The ``gsa_*`` and
    slot fields are the conversion options (``t2r/layers/gsa.py`` describes the layer).
    """

    model_type = "t2r"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    # the teacher decoder
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # teacher's softmax kind per layer: full_attention | sliding_attention
    base_model_type: str = "llama"
    base_model_name_or_path: str | None = None
    # the conversion
    mixer: str = LIMITS["mixer"].default  # what replaces softmax attention: gsa | gla | linear (t2r/layers/gla.py)
    gsa_layers: list[int] | None = None  # None: every layer
    # (defaults and allowed values: t2r/conversion_limits.py, shared with the conversion options)
    num_slots: int = LIMITS["num_slots"].default
    gate_logit_normalizer: float = LIMITS["gate_logit_normalizer"].default
    feature_map: str = LIMITS["feature_map"].default
    use_rope: bool = LIMITS["use_rope"].default
    gsa_scale: float | None = LIMITS["gsa_scale"].default  # None: gsa_logit_scale picks one by feature map
    # (and head_dim ** -0.5 for the gla and linear mixers)
    v_activation: str = LIMITS["v_activation"].default
    output_norm: bool = LIMITS["output_norm"].default
    gate_source: str = LIMITS["gate_source"].default  # f_proj: a new gate projection; key: pooled from k_proj
    f_proj_init: str = LIMITS["f_proj_init"].default  # how the conversion initialised f_proj: key or random
    window_size: int = LIMITS["window_size"].default  # > 0: exact softmax over the last W tokens + GSA for older
    gsa_norm_eps: float = 1e-5
    gsa_backend: str = "auto"  # auto, torch or triton: our GSA kernels; for gla/linear fla's (kernels/gsa/backend.py)
    gate_rank: int = LIMITS["gate_rank"].default  # gla: rank of the low-rank gate projection
    linear_decay: str = LIMITS["linear_decay"].default  # linear: a fixed decay per kv head (RetNet's) or none

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.gsa_layers is None:
            self.gsa_layers = list(range(self.num_hidden_layers))
        self.gsa_layers = sorted(int(i) for i in self.gsa_layers)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError naming any field whose value the model cannot run with."""
        L = self.num_hidden_layers
        bad = [i for i in self.gsa_layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"gsa_layers {bad} out of range: the model has layers 0..{L - 1}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name, limit in LIMITS.items():
            problem = limit.problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        if self.gsa_backend not in BACKENDS:
            raise ValueError(f"gsa_backend={self.gsa_backend!r} is not one of {', '.join(BACKENDS)}")
        if self.feature_map == "hedgehog" and self.head_dim % 2:
            raise ValueError(f"feature_map='hedgehog' needs an even head_dim, got {self.head_dim}")
        if len(self.layer_types) != L:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {L} layers")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def gsa_logit_scale(self) -> float:
        if self.gsa_scale is not None:
            return float(self.gsa_scale)
        if self.mixer != "gsa":  # gla, linear: the teacher's 1/sqrt(d) on q . k
            return self.head_dim ** -0.5
        if self.feature_map == "swish":
            return 1.0
        return self.head_dim ** (0.5 if self.feature_map in ("softmax", "hedgehog") else -0.5)

    def state_floats_per_layer(self) -> int:
        """fp32 numbers in one converted layer's recurrent state, per sequence (the window's ring buffer
        apart): GSA's slot keys and values (H x M x 2D), or the gla/linear state (H x D x D)."""
        H, D = self.num_key_value_heads, self.head_dim
        return H * D * D if self.mixer != "gsa" else H * self.num_slots * 2 * D

    def is_gsa_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.gsa_layers

    def window(self, layer_idx: int) -> int | None:
        """The teacher's sliding window at this layer (None: full causal attention)."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
