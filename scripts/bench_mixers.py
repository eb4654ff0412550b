"""Time the mixers' operators on one GPU at SmolLM2-135M's attention shape, and check them there first.

9 query heads, 3 kv heads, head dim 64, 64 GSA slots, bf16. Rows: GSA on its Triton kernels and on its
torch path; the gla operator (the gla mixer: a data-dependent gate per key dimension) and the same
operator with the linear mixer's fixed RetNet decay per kv head, each on fla's Triton kernels (backend
'triton', kernels/gla/ops.py) and on our chunked torch path. Each row: forward, forward + backward over
B x T tokens, and one decoding step. Before timing, each operator's output is compared with the fp32
loop (a wrong one is reported, not timed). Times are medians of triton.testing.do_bench; memory is the
peak allocated during one forward + backward.

    python scripts/bench_mixers.py [--ts 2048,8192] [--tokens 16384] [--out DIR]
    python scripts/bench_mixers.py --smoke    # CPU self-check: the comparisons alone, tiny shapes

--smoke checks the rows this machine can run (the torch rows; the Triton rows too on CUDA, or GSA's
under TRITON_INTERPRET=1; fla's CPU check needs test-only shims: tests/kernels/test_gla_fla.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2r.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla  # noqa: E402
from t2r.kernels.gsa import chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa  # noqa: E402

HQ, H, D, M = 9, 3, 64, 64
DT = torch.bfloat16
CHECK_TOL = 1e-2  # fp32 inputs; the kernels' fp32 dots may run in tf32 (~1e-3): a wrong one is far off
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, T, mixer, seed=0, dtype=DT):
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32)

    q, k, v = rnd(B, T, HQ, D), rnd(B, T, H, D), rnd(B, T, H, D)
    if mixer == "gsa":
        g = F.logsigmoid(rnd(B, T, H, M)) / 8
        return [x.to(dtype) for x in (q, k, v, -torch.expm1(g), g)]
    if mixer == "linear":  # RetNet's decay 1 - 2^(-5-h) per kv head (t2r/layers/gla.py)
        decay = torch.tensor([math.log1p(-2.0 ** (-5 - h)) for h in range(H)], device=DEV)
        g = decay[:, None].expand(B, T, H, D).contiguous()
    else:
        g = F.logsigmoid(rnd(B, T, H, D) + 4) / 8
    return [x.to(dtype) for x in (q, k, v, g)]


def rel(a, b):
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def _op(chunk, backend):
    return lambda *x, **kw: chunk(*x, backend=backend, **kw)


# name: (mixer, chunked op, decoding op, fp32 reference, backend)
OPS = {
    "gsa-triton": ("gsa", chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa, "triton"),
    "gsa-torch": ("gsa", chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa, "torch"),
    "gla-fla": ("gla", chunk_gla, fused_recurrent_gla, naive_recurrent_gla, "triton"),
    "gla-torch": ("gla", chunk_gla, fused_recurrent_gla, naive_recurrent_gla, "torch"),
    "linear-fla": ("linear", chunk_gla, fused_recurrent_gla, naive_recurrent_gla, "triton"),
    "linear-torch": ("linear", chunk_gla, fused_recurrent_gla, naive_recurrent_gla, "torch"),
}


def runnable(name) -> str | None:
    """Why row ``name`` cannot run here (None: it can)."""
    mixer, _, _, _, backend = OPS[name]
    if backend == "torch" or DEV == "cuda":
        return None
    if mixer != "gsa":
        return "fla's kernels: CUDA only here (tests/kernels/test_gla_fla.py checks them on CPU)"
    return None if os.environ.get("TRITON_INTERPRET") == "1" else "GSA's Triton kernels: CUDA or TRITON_INTERPRET=1"


def check(name, B=2, T=77):
    mixer, chunk, _, ref, backend = OPS[name]
    x = inputs(B, T, mixer, seed=1, dtype=torch.float32)
    o, _ = chunk(*x, backend=backend)
    o_ref, _ = ref(*x)
    return rel(o, o_ref)


def train_row(name, B, T):
    from triton.testing import do_bench

    mixer, chunk, _, _, backend = OPS[name]
    x = [t.requires_grad_() for t in inputs(B, T, mixer)]
    do = torch.randn(B, T, HQ, D, device=DEV, dtype=DT)

    def step():
        o, _ = chunk(*x, backend=backend)
        o.backward(do)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    with torch.no_grad():
        fwd = do_bench(lambda: chunk(*x, backend=backend))
    return {"fwd_ms": fwd, "fwd_bwd_ms": do_bench(step, grad_to_none=x), "peak_gib": peak}


def decode_row(name, B=8):
    from triton.testing import do_bench

    mixer, _, decode, _, backend = OPS[name]
    x = inputs(B, 1, mixer)
    if mixer == "gsa":
        state = (torch.zeros(B, H, D, M, device=DEV), torch.zeros(B, H, M, D, device=DEV))
    else:
        state = torch.zeros(B, H, D, D, device=DEV)
    with torch.no_grad():
        return {"decode_step_us": 1e3 * do_bench(
            lambda: decode(*x, initial_state=state, output_final_state=True, backend=backend))}


def smoke(out):
    """The comparisons alone, at tiny shapes, for every row this machine can run."""
    results = {"device": DEV, "rows": {}}
    for name in OPS:
        why = runnable(name)
        results["rows"][name] = {"skipped": why} if why else {"check_rel_err": check(name, B=2, T=21)}
        print(f"{name}: {results['rows'][name]}", flush=True)
    with open(os.path.join(out, "bench_mixers.json"), "w") as f:
        json.dump(results, f, indent=2)
    bad = [n for n, r in results["rows"].items() if not r.get("check_rel_err", 0) < CHECK_TOL]
    if bad:
        sys.exit(f"wrong against the fp32 loop: {', '.join(bad)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="2048,8192")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="CPU self-check: compare each runnable row, time nothing")
    args = ap.parse_args()
    if args.smoke:
        return smoke(args.out)
    if DEV != "cuda":
        sys.exit("bench_mixers.py times on a GPU; on CPU run --smoke")
    results = {"shape": dict(HQ=HQ, H=H, D=D, M=M, dtype=str(DT)), "gpu": torch.cuda.get_device_name(),
               "state_bytes_per_layer": {"gsa": H * M * 2 * D * 4, "gla/linear": H * D * D * 4}, "rows": {}}
    for name in OPS:
        try:
            err = check(name)
        except Exception as e:  # fla missing, say: report the row, time the others
            results["rows"][name] = {"error": str(e).splitlines()[0]}
            print(f"{name}: {results['rows'][name]['error']}", flush=True)
            continue
        print(f"{name}: rel err vs fp32 loop on CUDA (fp32, B=2, T=77): {err:.2e}", flush=True)
        row = results["rows"].setdefault(name, {"check_rel_err": err})
        if not err < CHECK_TOL:
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
