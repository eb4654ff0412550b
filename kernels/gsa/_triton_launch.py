"""Launching a chunk kernel with fewer software-pipelining stages when its configured count needs more
shared memory than the GPU has.

Each pipelining stage keeps one more copy of a loop's input tiles in shared memory, so how many fit
depends on the shapes (head dims, slots), on which branches a kernel compiles and on the GPU (about
227 KiB a block on Hopper, 99 KiB on consumer cards). Triton reports a kernel that does not fit when
it loads it, before anything runs (``OutOfResources``); ``launch`` then takes one stage fewer, down to
one, and remembers the count that fit for that kernel and those compile-time arguments. A kernel
that does not fit with one stage fails with an error that names the torch path.
"""
from __future__ import annotations

import logging

import triton.language as tl
from triton.runtime.errors import OutOfResources

log = logging.getLogger("t2r.kernels")

# (kernel, configured stages, compile-time arguments) -> the stages that fit
_FITTED: dict[tuple, int] = {}


def _compile_key(kernel, num_stages: int, kwargs: dict) -> tuple:
    # the arguments that select a compiled variant (ints, flags, strings, dtypes); not tensors nor floats.
    # Each call site passes its keywords in one order, so no sorting on this per-launch path
    fixed = tuple((k, v) for k, v in kwargs.items() if isinstance(v, (int, str, tl.dtype)))
    return kernel, num_stages, fixed


def launch(kernel, grid, num_stages: int, **kwargs) -> int:
    """``kernel[grid](**kwargs, num_stages=...)`` with the most stages up to ``num_stages`` that fit in
    shared memory; returns the count it ran with. A kernel that does not fit with one stage raises
    RuntimeError, naming the torch path."""
    key = _compile_key(kernel, num_stages, kwargs)
    stages = _FITTED.get(key, num_stages)
    while True:
        try:
            kernel[grid](**kwargs, num_stages=stages)
        except OutOfResources as err:
            name = getattr(kernel, "__name__", kernel)
            if stages <= 1:
                raise RuntimeError(
                    f"the GSA kernel {name} does not fit this GPU's shared memory even with one pipelining stage "
                    f"({err}); run the torch implementation instead: T2R_GSA_BACKEND=torch (or backend='torch'), "
                    "or a GPU with more shared memory per block") from err
            log.info("%s: %s; retrying with %d pipelining stages", name, err, stages - 1)
            stages -= 1
            continue
        _FITTED[key] = stages
        return stages
