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
           "_triton_chunk", "_triton_fused_recurrent", "_triton_decode_step"]


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


_fla_interpreted = False  # fla was first imported by fla_interpreter (its kernels are interpreted)


class _LoopIndex(int):
    """A ``range`` index with compiled Triton's ``.to(dtype)`` (the interpreter's are plain ints)."""

    def to(self, dtype, **_):
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle, _get_np_dtype

        return tl.tensor(TensorHandle(np.array(int(self), dtype=_get_np_dtype(dtype)), dtype), dtype)


def _loop_range(*args):
    return (_LoopIndex(i) for i in range(*args))


def _interpreted_language_helpers():
    """Swap triton.language's own @jit helpers (tl.cdiv, ...) for interpreted ones: they are
    decorated when triton is imported, before the interpreter was on. Returns what to restore."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped = []
    for module in (tl, tl.standard):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swapped.append((module, name, value))
                setattr(module, name, InterpretedFunction(value.fn))
    return swapped


@contextmanager
def fla_interpreter():
    """fla's GLA kernels on CPU through the Triton interpreter (on CUDA nothing is changed).

    fla 0.6 assumes compiled Triton in two places, shimmed here for the tests only: its autotuners
    benchmark every config on a GPU driver (RuntimeError '0 active drivers'): each takes its first
    config; and its kernels call ``.to(tl.int64)`` on ``for i_t in range(NT)`` indices (AttributeError
    "'int' object has no attribute 'to'"): ``range`` in fla's op modules yields ints that have it.
    Its kernels also call triton.language's jitted helpers (tl.cdiv), interpreted here whenever
    triton was imported first. fla must be first imported here (Triton decorates kernels at import)."""
    if CUDA:
        yield
        return
    import pytest
    from triton.runtime import autotuner

    global _fla_interpreted
    fresh = not any(name == "fla" or name.startswith("fla.") for name in sys.modules)
    with triton_interpreter():
        if not (fresh or _fla_interpreted):
            pytest.skip("fla was imported before the Triton interpreter was on; run these tests in their own process")
        import fla.ops.gla  # noqa: F401

        _fla_interpreted = True

        helpers = _interpreted_language_helpers()
        prune = autotuner.Autotuner.prune_configs
        autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
        mods = [m for name, m in sys.modules.items() if name.startswith("fla.ops") and m is not None]
        for m in mods:
            m.range = _loop_range
        try:
            yield
        finally:
            autotuner.Autotuner.prune_configs = prune
            for module, name, jitted in helpers:
                setattr(module, name, jitted)
            for m in mods:
                del m.range
