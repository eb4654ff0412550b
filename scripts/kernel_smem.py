"""Shared memory each GSA chunk kernel needs at a model's attention shapes, compiled for a GPU
architecture on any machine (Triton's own compiler, no GPU needed). Prints a table; with --check,
exits 1 if a kernel does not fit at the pipelining stages it is configured with (``CONFIG``), so it
would fall back to fewer stages at run time (kernels/gsa/_triton_launch.py) or, at one stage, fail.

    python scripts/kernel_smem.py                                  # Mistral-7B's and SmolLM2's shapes, sm_90
    python scripts/kernel_smem.py --shapes 128x64x4 --arch 89 --limit 101376 # a consumer Ada card
    python scripts/kernel_smem.py --check

A shape is KxMxG: head dim, slots, query heads per kv head. The kernels are those one forward and
backward of ``chunk_gsa`` launches in bf16 (fp32 with --fp32). Each launch is recorded without running
(the host wrappers run on CPU tensors; every kernel is replaced by a recorder), then compiled as
Triton would specialise it on the GPU (16-byte aligned pointers, ints divisible by 16 marked so), for
its configured stages and, where those do not fit, fewer.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before Triton loads: kernels it can compile, not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2r.kernels.gsa import _triton_chunk_bwd, _triton_chunk_fwd, _triton_chunk_state, _triton_inputs  # noqa: E402

MODULES = (_triton_chunk_state, _triton_chunk_fwd, _triton_chunk_bwd)
SHAPES = {"128x64x4": "Mistral-7B / Llama-3-8B (head dim 128, 64 slots, 4 query heads a kv head)",
          "64x64x3": "SmolLM2-135M (head dim 64, 64 slots, 3 query heads a kv head)"}
HOPPER_LIMIT = 232448  # bytes a block may use on sm_90 (H100, H200)
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}


def record_launches(K: int, M: int, G: int, dtype: torch.dtype, H: int = 2, T: int = 2048) -> list[tuple]:
    """(kernel, kwargs) of every kernel one chunk_gsa forward and backward launches at these shapes."""
    from t2r.kernels.gsa._triton_chunk import chunk_gsa_triton

    records = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: records.append((self.kernel, kwargs))

    saved, gpu_rule = {}, _triton_inputs.fp32_operands
    for module in MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                saved[(module, name)] = obj
                setattr(module, name, Recorder(obj))
    # the host wrappers accept CPU tensors under the interpreter's flag (the kernels were loaded without
    # it), and pick the operand dtypes a GPU would get
    os.environ["TRITON_INTERPRET"] = "1"
    _triton_inputs.fp32_operands = lambda x: x.dtype == torch.float32
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, T, H * G, K, generator=gen).to(dtype).requires_grad_()
        k = torch.randn(1, T, H, K, generator=gen).to(dtype).requires_grad_()
        v = torch.randn(1, T, H, K, generator=gen).to(dtype).requires_grad_()
        s = torch.rand(1, T, H, M, generator=gen).to(dtype).requires_grad_()
        g = (-torch.rand(1, T, H, M, generator=gen)).to(dtype).requires_grad_()
        o, _ = chunk_gsa_triton(q, k, v, s, g)
        o.sum().backward()  # the forward's outputs are unwritten memory: only the launches matter here
    finally:
        os.environ.pop("TRITON_INTERPRET")
        _triton_inputs.fp32_operands = gpu_rule
        for (module, name), obj in saved.items():
            setattr(module, name, obj)
    return records


def shared_bytes(kernel, kwargs: dict, arch: int, num_stages: int) -> int:
    """Bytes of shared memory ``kernel`` needs with these arguments, compiled for sm_``arch``."""
    params = kernel.params
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = kwargs[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared


def rows(shape: str, dtype: torch.dtype, arch: int, limit: int) -> list[dict]:
    K, M, G = map(int, shape.split("x"))
    out, seen = [], set()
    for kernel, kwargs in record_launches(K, M, G, dtype):
        stages = kwargs.pop("num_stages", None)
        if stages is None:  # the scans and the last backward kernel: no pipelined loop
            continue
        key = (kernel, tuple(sorted((k, str(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
        if key in seen:
            continue
        seen.add(key)
        need = shared_bytes(kernel, kwargs, arch, stages)
        fits, there = stages, need
        while there > limit and fits > 1:  # what the launch falls back to
            fits -= 1
            there = shared_bytes(kernel, kwargs, arch, fits)
        out.append({"shape": shape, "kernel": kernel.__name__, "stages": stages, "bytes": need,
                    "fits": need <= limit, "stages_that_fit": fits, "bytes_there": there})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="KxMxG, comma-separated")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100/H200)")
    ap.add_argument("--limit", type=int, default=HOPPER_LIMIT, help="shared memory a block may use, bytes")
    ap.add_argument("--fp32", action="store_true", help="fp32 inputs (the kernels' fp32 path) instead of bf16")
    ap.add_argument("--check", action="store_true", help="exit 1 if a kernel does not fit at its configured stages")
    args = ap.parse_args()
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(f"shared memory per block, sm_{args.arch}, limit {args.limit:,} bytes, {str(dtype)[6:]} inputs\n")
    print("| shape | kernel | stages | bytes | fits | stages that fit | bytes there |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for shape in args.shapes.split(","):
        for r in rows(shape, dtype, args.arch, args.limit):
            table.append(r)
            fit_there = r["bytes_there"] <= args.limit
            print(f"| {shape} | {r['kernel']} | {r['stages']} | {r['bytes']:,} | {'yes' if r['fits'] else 'NO'} | "
                  f"{r['stages_that_fit'] if fit_there else 'none'} | {r['bytes_there']:,} |", flush=True)
    misfits = [r for r in table if not r["fits"]]
    for r in misfits:
        print(f"\n{r['kernel']} at {r['shape']} needs {r['bytes']:,} bytes with {r['stages']} stages, over "
              f"{args.limit:,}: lower its stages in kernels/gsa/_triton_chunk.py CONFIG", file=sys.stderr)
    return 1 if args.check and misfits else 0


if __name__ == "__main__":
    raise SystemExit(main())
