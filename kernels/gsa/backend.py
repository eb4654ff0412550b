"""Which implementation an operator call runs: the Triton kernels or the torch implementation.

One setting serves every mixer (``gsa_backend`` in the model config, ``backend=`` on the operators,
``$T2R_GSA_BACKEND``): for GSA 'triton' means our kernels, for the gla operator fla's (``needs``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .utils import GSAInputError

BACKENDS = ("auto", "torch", "triton")


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def triton_available() -> bool:
    return module_available("triton")


def resolve_backend(backend: str | None, x: torch.Tensor, needs: tuple[str, str] | None = None) -> str:
    """'torch' or 'triton' for a call on tensor ``x``.

    ``backend`` None means ``$T2R_GSA_BACKEND`` or 'auto'; 'auto' takes Triton on CUDA when the
    kernels can run. ``needs``: (module, install hint) the Triton path also imports (the gla
    operator's fla); 'auto' falls back to torch without it, 'triton' says how to install it.
    Forcing 'triton' on CPU tensors needs ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = backend or os.environ.get("T2R_GSA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise GSAInputError(f"unknown GSA backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    extra = needs is None or module_available(needs[0])
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() and extra else "torch"
    if choice == "triton":
        if not triton_available():
            raise GSAInputError("backend='triton' needs the triton package: pip install triton")
        if not extra:
            raise GSAInputError(f"backend='triton' needs the {needs[0]} package: {needs[1]} "
                                "(or choose backend 'torch' / 'auto')")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise GSAInputError(
                "backend='triton' got CPU tensors; move them to CUDA, or set TRITON_INTERPRET=1 "
                "to run the kernels in the Triton interpreter"
            )
    return choice
