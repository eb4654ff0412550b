"""What each conversion option may be: its default and its allowed values, in one table read by
``ConversionOptions`` (t2r/options.py: the ``t2r convert`` flags and the finetune config's
``model.conversion``) and by ``T2RConfig.check`` (a converted folder's config.json).

Plain Python, importing nothing: the command line builds its parser from this without torch, and an
export's remote code carries it as it is.
"""
from __future__ import annotations

# kernels.gsa.utils.MAX_DIM (the Triton kernels' limit on K, V and M), repeated here so that building the CLI's
# parser imports no torch; tests/test_cli_help.py checks the two agree
MAX_DIM = 128

FEATURE_MAPS = ("swish", "relu", "identity", "elu1", "softmax", "linear", "hedgehog")
V_ACTIVATIONS = ("silu", "identity")
GATE_SOURCES = ("f_proj", "key")
F_PROJ_INITS = ("key", "random")
MIXERS = ("gsa", "gla", "linear")
LINEAR_DECAYS = ("retnet", "none")


class Limit:
    """One option's default and allowed values: one of ``choices``, or a number within ``ge`` <= x <= ``le``,
    x > ``gt`` (the keywords pydantic's ``Field`` takes). A default of None stays allowed. ``mixers``: the
    mixers the option acts on (a conversion that sets it to another value for another mixer is refused)."""

    def __init__(self, default, choices: tuple = (), mixers: tuple = MIXERS, **bounds):
        self.default, self.choices, self.mixers, self.bounds = default, choices, mixers, bounds

    def problem(self, name: str, value) -> str | None:
        """Why ``value`` is not allowed for option ``name`` (None: it is)."""
        if value is None and self.default is None:
            return None
        if self.choices:
            return None if value in self.choices else f"{name}={value!r} is not one of {', '.join(self.choices)}"
        ok = {"ge": lambda b: value >= b, "le": lambda b: value <= b, "gt": lambda b: value > b}
        words = {"ge": ">=", "le": "<=", "gt": ">"}
        if all(ok[k](b) for k, b in self.bounds.items()):
            return None
        return f"{name}={value!r} must be " + " and ".join(f"{words[k]} {b}" for k, b in self.bounds.items())


LIMITS = {
    "mixer": Limit("gsa", MIXERS),
    "num_slots": Limit(64, ge=1, le=MAX_DIM, mixers=("gsa",)),
    "gate_logit_normalizer": Limit(8.0, gt=0),
    "feature_map": Limit("swish", FEATURE_MAPS),
    "use_rope": Limit(False),
    "gsa_scale": Limit(None, gt=0),
    "v_activation": Limit("silu", V_ACTIVATIONS),
    "output_norm": Limit(True),
    "gate_source": Limit("f_proj", GATE_SOURCES, mixers=("gsa",)),
    "f_proj_init": Limit("key", F_PROJ_INITS, mixers=("gsa",)),
    "window_size": Limit(0, ge=0, le=4096),
    "gate_rank": Limit(16, ge=1, le=1024, mixers=("gla",)),
    "linear_decay": Limit("retnet", LINEAR_DECAYS, mixers=("linear",)),
}
