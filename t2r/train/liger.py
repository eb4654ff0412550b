"""liger-kernel, an optional dependency (``pip install 't2r[fused]'``): its pieces, or why they do not import."""
from __future__ import annotations

import importlib


def liger_imports(*paths: str):
    """(the objects at these dotted paths, ``module.name``, None), or (None, the reason they do not import)."""
    try:
        found = tuple(getattr(importlib.import_module(module), name)
                      for module, name in (path.rsplit(".", 1) for path in paths))
    except Exception as e:  # not installed, or built for another triton/torch
        return None, f"{type(e).__name__}: {e}"
    return found, None
