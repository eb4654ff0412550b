"""Which implementation a GSA call runs: the Triton kernels or the torch implementation."""
from __future__ import annotations

import os

import torch

from .utils import GSAInputError

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """'torch' or 'triton' for a call on tensor ``x``.

    ``backend`` None means ``$T2R_GSA_BACKEND`` or 'auto'; 'auto' takes Triton on CUDA.
    Forcing 'triton' on CPU tensors needs ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = backend or os.environ.get("T2R_GSA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise GSAInputError(f"unknown GSA backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise GSAInputError("backend='triton' needs the triton package: pip install triton")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise GSAInputError(
                "backend='triton' got CPU tensors; move them to CUDA, or set TRITON_INTERPRET=1 "
                "to run the kernels in the Triton interpreter"
            )
    return choice
