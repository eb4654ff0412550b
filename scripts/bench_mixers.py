"""Time the mixers' operators on one GPU at SmolLM2-135M's attention shape, and check them there first.

9 query heads, 3 kv heads, head dim 64, 64 GSA slots, bf16. Rows: GSA on its Triton kernels, GSA on
its torch path, and the gla operator (the gla and linear mixers; torch path, kernels/gla/ops.py says
why), each forward + backward over B x T tokens, and one decoding step. Before timing, each operator's
output on CUDA is compared with the fp32 loop (a wrong one is reported, not timed). Times are medians of
triton.testing.do_bench; memory is the peak allocated during one forward + backward.

    python scripts/bench_mixers.py [--ts 2048,8192] [--tokens 16384] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla  # noqa: E402
from kernels.gsa import chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa  # noqa: E402

HQ, H, D, M = 9, 3, 64, 64
DT, DEV = torch.bfloat16, "cuda"


def inputs(B, T, mixer, seed=0, dtype=DT):
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32)

    q, k, v = rnd(B, T, HQ, D), rnd(B, T, H, D), rnd(B, T, H, D)
    if mixer == "gsa":
        g = F.logsigmoid(rnd(B, T, H, M)) / 8
        return [x.to(dtype) for x in (q, k, v, -torch.expm1(g), g)]
    return [x.to(dtype) for x in (q, k, v, F.logsigmoid(rnd(B, T, H, D) + 4) / 8)]


def rel(a, b):
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


OPS = {
    "gsa-triton": ("gsa", lambda *x, **kw: chunk_gsa(*x, backend="triton", **kw), naive_recurrent_gsa),
    "gsa-torch": ("gsa", lambda *x, **kw: chunk_gsa(*x, backend="torch", **kw), naive_recurrent_gsa),
    "gla-torch": ("gla", chunk_gla, naive_recurrent_gla),
}


def check(name):
    mixer, op, ref = OPS[name]
    x = inputs(2, 77, mixer, seed=1, dtype=torch.float32)
    o, _ = op(*x)
    o_ref, _ = ref(*x)
    return rel(o, o_ref)


def train_row(name, B, T):
    from triton.testing import do_bench

    mixer, op, _ = OPS[name]
    x = [t.requires_grad_() for t in inputs(B, T, mixer)]
    do = torch.randn(B, T, HQ, D, device=DEV, dtype=DT)

    def step():
        o, _ = op(*x)
        o.backward(do)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    with torch.no_grad():
        fwd = do_bench(lambda: op(*x))
    return {"fwd_ms": fwd, "fwd_bwd_ms": do_bench(step, grad_to_none=x), "peak_gib": peak}


def decode_row(name, B=8):
    from triton.testing import do_bench

    mixer, _, _ = OPS[name]
    x = inputs(B, 1, mixer)
    if mixer == "gsa":
        state = (torch.zeros(B, H, D, M, device=DEV), torch.zeros(B, H, M, D, device=DEV))
        backend = "triton" if name == "gsa-triton" else "torch"
        fn = lambda: fused_recurrent_gsa(*x, initial_state=state, output_final_state=True, backend=backend)  # noqa: E731
    else:
        state = torch.zeros(B, H, D, D, device=DEV)
        fn = lambda: fused_recurrent_gla(*x, initial_state=state, output_final_state=True)  # noqa: E731
    with torch.no_grad():
        return {"decode_step_us": 1e3 * do_bench(fn)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="2048,8192")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    results = {"shape": dict(HQ=HQ, H=H, D=D, M=M, dtype=str(DT)), "gpu": torch.cuda.get_device_name(),
               "state_bytes_per_layer": {"gsa": H * M * 2 * D * 4, "gla/linear": H * D * D * 4}, "rows": {}}
    for name in OPS:
        err = check(name)
        print(f"{name}: rel err vs fp32 loop on CUDA (fp32, B=2, T=77): {err:.2e}", flush=True)
        row = results["rows"].setdefault(name, {"check_rel_err": err})
        if not err < 1e-3:
            continue
        for T in map(int, args.ts.split(",")):
            B = max(1, args.tokens // T)
            try:
                row[f"T={T}"] = train_row(name, B, T)
            except torch.OutOfMemoryError as e:
                row[f"T={T}"] = {"error": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
            print(f"  B={B} T={T}: {row[f'T={T}']}", flush=True)
        row.update(decode_row(name))
        print(f"  decode step (B=8): {row['decode_step_us']:.1f} us", flush=True)
    with open(os.path.join(args.out, "bench_mixers.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
