"""Run the GSA Triton kernels on CPU through the Triton interpreter (for CI, which has no GPU).

Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when our kernel modules are
imported. The kernel modules are imported lazily (only when the Triton backend is used), so
setting the variable before the first call is enough; if some earlier code imported them
without it, they are reloaded here. On a CUDA machine nothing is changed.
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# dependency order: a module is reloaded after the modules it imports names from
MODULES = ["_triton_inputs", "_triton_intra", "_triton_chunk_state", "_triton_chunk_fwd", "_triton_chunk_bwd",
           "_triton_chunk", "_triton_fused_recurrent"]


@contextmanager
def triton_interpreter():
    if CUDA:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime.interpreter import InterpretedFunction

        intra = sys.modules.get("t2r.kernels.gsa._triton_intra")
        if intra is not None and not isinstance(intra.op1, InterpretedFunction):
            for name in MODULES:
                mod = sys.modules.get(f"t2r.kernels.gsa.{name}")
                if mod is not None:
                    importlib.reload(mod)
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@contextmanager
def poisoned_outputs():
    """Every float tensor the kernels' host code allocates with torch.empty / empty_like starts
    as NaN, so an element a kernel forgets to write fails the comparison (NaN never passes)."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.dtype.is_floating_point else x

    def nan_empty_like(*args, **kwargs):
        x = empty_like(*args, **kwargs)
        return x.fill_(float("nan")) if x.dtype.is_floating_point else x

    torch.empty, torch.empty_like = nan_empty, nan_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
