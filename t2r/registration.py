"""The "t2r" model type in transformers' Auto classes, without importing torch at ``import t2r``.

``t2r.models`` registers the real classes when it is imported. Until then (``import t2r`` alone, as
the command line does) transformers' CONFIG_MAPPING gets a stand-in for "t2r" as soon as transformers'
auto configuration module exists (now, or when it is first imported); the stand-in's first use
imports ``t2r.models``, which replaces it, so ``AutoModelForCausalLM.from_pretrained(converted)``
after ``import t2r`` finds both the config and the model class.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODEL_TYPE = "t2r"
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"


class _LazyT2RConfig:
    """Answers as ``T2RConfig`` (attributes, calls), importing it on first use."""

    model_type = MODEL_TYPE

    @staticmethod
    def _real():
        from .models import T2RConfig  # registers the real classes

        return T2RConfig

    def __getattr__(self, name):
        return getattr(self._real(), name)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)


def _add_stand_in() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        CONFIG_MAPPING.register(MODEL_TYPE, _LazyT2RConfig(), exist_ok=True)


class _WhenConfigAutoLoads(importlib.abc.MetaPathFinder):
    """Adds the stand-in right after transformers' auto configuration module has run (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != _CONFIG_AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _add_stand_in()

            spec.loader.exec_module = exec_module
        return spec


def register_lazily() -> None:
    if _CONFIG_AUTO in sys.modules:
        _add_stand_in()
    elif not any(isinstance(f, _WhenConfigAutoLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenConfigAutoLoads())
