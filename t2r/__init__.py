"""t2r: convert pretrained Transformers to Gated Slot Attention RNNs, finetune, export.

Importing t2r registers the converted model type ("t2r") with transformers' AutoConfig and
AutoModelForCausalLM, so converted folders load with plain ``from_pretrained``. The import itself
is light (no torch): the model classes load on first use (``t2r.T2RForCausalLM``, or transformers
meeting a "t2r" config); see :mod:`t2r.registration`.
"""
from .registration import register_lazily

__version__ = "0.1.0"

_MODELS = ("T2RCache", "T2RConfig", "T2RForCausalLM", "T2RModel")


def __getattr__(name: str):
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 't2r' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODELS])


register_lazily()

__all__ = [*_MODELS, "__version__"]
