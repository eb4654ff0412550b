"""Time t2r's GSA Triton kernels against fla 0.6.0 and FlashAttention (torch SDPA) on one GPU.

Mistral-7B attention shapes: 32 query heads, 8 kv heads, head dim 128, 64 slots, bf16, B x T = 16384.
Every kernel's output is checked against the fp32 torch reference before it is timed (a wrong
kernel is reported, not timed). Times are medians of triton.testing.do_bench (CUDA events).

    python scripts/bench_kernels.py [--out DIR] [--sweep] [--skip-fla] [--breakdown] [--no-decode] [--ts 2048,4096]
                                    [--gates normal,strong,steep,near0] [--real-gates GATES.pt]
                                    [--baseline OTHER_CHECKOUT]

--breakdown profiles one forward+backward per kernel (torch.profiler) for the configurations in
--breakdown-configs, against each kernel's FLOP and byte floors; --sweep times the SWEEP
configurations (the first at every T). --gates times our chunk kernels at the first T under each kind
of forget gate (tests/kernels/gsa_inputs.py), with the share of chunks each gate regime takes (factored,
blocked, pairwise: kernels/gsa/_triton_intra.py). --real-gates adds rows on a model's own gates, saved
by `scripts/gate_regimes.py --save` (every layer's gates on one row of text as the batch, at that model's
head counts, random q/k/v, s = 1 - exp(g) as the layer makes it), and on random gates at that shape.
--baseline times another checkout's kernels (e.g. `git worktree add /tmp/base HEAD~1`) on the same
inputs, for before/after ratios from one run. fla autotunes on its first call (over 4 minutes on the H200);
its results from an earlier run are seeded into the Triton cache (--fla-autotune), which brings fla's
first row to ~20 s. Prints markdown tables (the last one is the summary that
docs/benchmarks.md carries) and writes the raw numbers to DIR/bench.json after each stage.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

# fla's kernels autotune on their first call (minutes on the H200); keep the results in the Triton
# cache (~/.triton/cache) so that a later run, or one given that cache, times fla in seconds
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HQ, H, D, M = 32, 8, 128, 64
G = HQ // H
TOKENS = 16384
TS = [2048, 4096, 8192, 16384, 32768]
DT = torch.bfloat16
DEV = "cuda"
RESULTS: dict = {"train": {}, "decode": {}, "breakdown": {}, "sweep": {}, "gates": {}, "errors": {}}
GATE_KINDS = ("normal", "strong", "steep", "near0")


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def bench(fn, grad_to_none=None):
    if DEV == "cpu":  # --smoke: the script's logic on CPU (Triton interpreter), not a timing
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def inputs(B, T, seed=0, device=None):
    device = device or DEV
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    q, k, v = r(B, T, HQ, D), r(B, T, H, D), r(B, T, H, D)
    g = F.logsigmoid(r(B, T, H, M)) / 8  # the GSA layer's gates (gate_logit_normalizer 8)
    s = 1 - g.exp()
    return [x.to(DT) for x in (q, k, v, s, g)]


def rep(x):
    return x.repeat_interleave(G, dim=2)


def leaves(xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def kernel_stats():
    """Registers and spills of every compiled t2r kernel (where this Triton exposes them)."""
    from t2r.kernels.gsa import _triton_chunk_bwd, _triton_chunk_fwd, _triton_chunk_state, _triton_fused_recurrent

    out = {}
    for mod in (_triton_chunk_state, _triton_chunk_fwd, _triton_chunk_bwd, _triton_fused_recurrent):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                for ck in dev_cache[0].values():
                    out.setdefault(name, []).append({"regs": getattr(ck, "n_regs", None),
                                                     "spills": getattr(ck, "n_spills", None),
                                                     "warps": getattr(getattr(ck, "metadata", None), "num_warps", None)})
    return out


# ------------------------------------------------------------------------------------ training

REFS: dict = {}


def train_row(T, check_grads, sdpa=True):
    from t2r.kernels.gsa import chunk_gsa
    from t2r.kernels.gsa.chunk_torch import chunk_gsa_torch

    B = max(1, TOKENS // T)
    row = {"B": B, "T": T}
    x = inputs(B, T, seed=T)
    do = torch.randn(B, T, HQ, D, device=DEV, dtype=DT)
    ref_in = leaves([t.float() for t in x])
    ref_o, _ = chunk_gsa_torch(*ref_in)
    if check_grads:
        ref_o.backward(do.float())
        ref_g = [t.grad for t in ref_in]
    ref_o = ref_o.detach()
    REFS[T] = (ref_o, ref_g[0] if check_grads else None, do)
    del ref_in
    torch.cuda.empty_cache()

    # ours
    ours = leaves(x)
    o, _ = chunk_gsa(*ours, backend="triton")
    row["ours_err"] = rel(o, ref_o)
    if check_grads:
        o.backward(do)
        row["ours_grad_err"] = max(rel(a.grad, b) for a, b in zip(ours, ref_g))
    ok = row["ours_err"] < 1e-2 and row.get("ours_grad_err", 0) < 1e-2
    if ok:
        with torch.no_grad():
            row["ours_fwd"] = bench(lambda: chunk_gsa(*x, backend="triton"))

        def ours_step():
            out, _ = chunk_gsa(*ours, backend="triton")
            out.backward(do)

        row["ours_fwdbwd"] = bench(ours_step, grad_to_none=ours)
    del ours, o
    torch.cuda.empty_cache()

    if not sdpa:
        return row
    sdpa_rows(T, x, do, row)
    return row


def load_baseline_kernels(checkout: str):
    """The GSA kernels of another t2r checkout (its kernels/ folder, which imports t2r/errors.py), as the
    module ``t2r_baseline.kernels.gsa``; the other checkout's t2r/__init__.py is not run."""
    import importlib
    import importlib.util
    import types

    folder = os.path.join(checkout, "kernels")
    if not os.path.isfile(os.path.join(folder, "__init__.py")):
        raise SystemExit(f"--baseline {checkout}: no kernels/__init__.py there; give a t2r checkout")
    parent = types.ModuleType("t2r_baseline")
    parent.__path__ = [os.path.join(checkout, "t2r")]
    sys.modules["t2r_baseline"] = parent
    spec = importlib.util.spec_from_file_location("t2r_baseline.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["t2r_baseline.kernels"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("t2r_baseline.kernels.gsa")


def real_gate_inputs(path, random_gates=False):
    """q, k, v, s, g at a model's shapes around its saved gates (scripts/gate_regimes.py --save): the layers
    as the batch; with random_gates, the benchmark's random gates at that shape instead."""
    saved = torch.load(path)
    g = saved["g"].to(DEV, torch.float32)  # [L, T, H, M]
    L, T, Hk, Mk = g.shape
    gen = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *sh: torch.randn(*sh, generator=gen, device=DEV)  # noqa: E731
    d = saved["head_dim"]
    q, k, v = r(L, T, saved["query_heads"], d), r(L, T, Hk, d), r(L, T, Hk, d)
    if random_gates:
        g = F.logsigmoid(r(L, T, Hk, Mk)) / 8
    return [x.to(DT) for x in (q, k, v, -torch.expm1(g), g)]


def gate_rows(T, kinds, baseline=None, real=None):
    """Our chunk kernels under each kind of gate at B x T = TOKENS: the share of (chunk, kv head) blocks in
    each regime, forward and forward+backward ms, and the output's error against the fp32 reference; with
    ``baseline`` (a kernels.gsa module of another checkout) its forward+backward on the same inputs."""
    from t2r.kernels.gsa import chunk_gsa
    from t2r.kernels.gsa.chunk_torch import chunk_gsa_torch
    from t2r.kernels.gsa.utils import REGIME_NAMES, chunk_regimes
    from tests.kernels.gsa_inputs import make_inputs

    B = max(1, TOKENS // T)
    rows = {}
    for kind in kinds + ([f"normal:{os.path.basename(real)}", f"real:{os.path.basename(real)}"] if real else []):
        if ":" in kind:  # the saved gates' model shapes, with random ('normal') or the saved ('real') gates
            x = real_gate_inputs(real, random_gates=kind.startswith("normal"))
        else:
            x = make_inputs(B, T, HQ, H, K=D, V=D, M=M, dtype=DT, gate=kind, seed=T, device=DEV)
        regimes = chunk_regimes(x[4])
        row = {"B": x[0].shape[0], "T": x[0].shape[1], "heads": f"{x[0].shape[2]}/{x[1].shape[2]}",
               **{n: (regimes == i).float().mean().item() for i, n in enumerate(REGIME_NAMES)}}
        do = torch.randn_like(x[0])
        with torch.no_grad():
            ref = chunk_gsa_torch(*[t.float() for t in x])[0]
            row["err"] = rel(chunk_gsa(*x, backend="triton")[0], ref)
            if baseline is not None:
                row["base_err"] = rel(baseline.chunk_gsa(*x, backend="triton")[0], ref)
        del ref
        if row["err"] < 1e-2:
            ours = leaves(x)
            with torch.no_grad():
                row["fwd"] = bench(lambda: chunk_gsa(*x, backend="triton"))

            def step():
                chunk_gsa(*ours, backend="triton")[0].backward(do)

            row["fwdbwd"] = bench(step, grad_to_none=ours)
        if baseline is not None and row["base_err"] < 1e-2:
            theirs = leaves(x)

            def base_step():
                baseline.chunk_gsa(*theirs, backend="triton")[0].backward(do)

            row["base_fwdbwd"] = bench(base_step, grad_to_none=theirs)
        rows[kind] = row
        log(f"gates {kind}: {json.dumps(row)}")
        del x, do
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


# SDPA backends timed in the same run: torch picks cuDNN on Hopper when allowed, FlashAttention-2
# otherwise; memory-efficient has no GQA path, so it gets k/v repeated to the query heads.
SDPA_BACKENDS = ["flash", "cudnn", "efficient", "default"]


def sdpa_rows(T, x, do, row):
    """Causal softmax attention on the same q/k/v ([B, H, T, D] contiguous) under each backend:
    row['sdpa_<backend>_fwd' / '_fwdbwd' / '_err'], and the fastest as row['sdpa_fwd' / 'sdpa_fwdbwd']
    with its name in row['sdpa_best']."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
             "efficient": [SDPBackend.EFFICIENT_ATTENTION], "default": None}
    qs = x[0].transpose(1, 2).contiguous().requires_grad_()
    ks = x[1].transpose(1, 2).contiguous().requires_grad_()
    vs = x[2].transpose(1, 2).contiguous().requires_grad_()
    dos = do.transpose(1, 2).contiguous()
    with torch.no_grad():  # fp32 reference on one query head group of the first sequence
        ref = F.scaled_dot_product_attention(qs[:1, :G].float(), ks[:1, :1].float().expand(1, G, T, D),
                                             vs[:1, :1].float().expand(1, G, T, D), is_causal=True)
    for name in SDPA_BACKENDS:
        gqa = name != "efficient"
        kk, vv = (ks, vs) if gqa else (ks.repeat_interleave(G, 1).detach().requires_grad_(),
                                       vs.repeat_interleave(G, 1).detach().requires_grad_())

        def att():
            if which[name] is None:
                return F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=gqa)
            with sdpa_kernel(which[name]):
                return F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=gqa)

        def step():
            att().backward(dos)

        try:
            with torch.no_grad():
                err = rel(att()[:1, :G], ref)
            row[f"sdpa_{name}_err"] = err
            if err > 1e-2:
                raise RuntimeError(f"SDPA {name}: relative error {err:.1e}")
            with torch.no_grad():
                row[f"sdpa_{name}_fwd"] = bench(att)
            row[f"sdpa_{name}_fwdbwd"] = bench(step, grad_to_none=[qs, kk, vv])
        except Exception as e:
            row[f"sdpa_{name}_error"] = repr(e)[:300]
            log(f"SDPA {name} at T={T}: {e!r}"[:300])
        del kk, vv
    timed = [n for n in SDPA_BACKENDS if row.get(f"sdpa_{n}_fwdbwd")]
    if timed:
        best = min(timed, key=lambda n: row[f"sdpa_{n}_fwdbwd"])
        row["sdpa_best"] = best
        row["sdpa_fwd"] = min(row[f"sdpa_{n}_fwd"] for n in timed)
        row["sdpa_fwdbwd"] = row[f"sdpa_{best}_fwdbwd"]
    del qs, ks, vs, dos
    torch.cuda.empty_cache()


def fla_row(T, row):
    """fla 0.6.0 chunk_gsa with k, v, s, g repeated to 32 heads (one state per query head)."""
    from fla.ops.gsa import chunk_gsa as fla_chunk_gsa

    B = max(1, TOKENS // T)
    x = inputs(B, T, seed=T)
    ref_o, ref_dq, do = REFS[T]  # the cotangent the reference gradients were taken with
    fx = leaves([x[0]] + [rep(t) for t in x[1:]])
    fo, _ = fla_chunk_gsa(*fx)
    row["fla_err"] = rel(fo, ref_o)
    if ref_dq is not None:
        fo.backward(do)
        row["fla_dq_err"] = rel(fx[0].grad, ref_dq)
    with torch.no_grad():
        row["fla_fwd"] = bench(lambda: fla_chunk_gsa(*[t.detach() for t in fx]))

    def fla_step():
        out, _ = fla_chunk_gsa(*fx)
        out.backward(do)

    row["fla_fwdbwd"] = bench(fla_step, grad_to_none=fx)
    del fx, fo
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ per-kernel times

def kernel_floors(B, T, C, NT, store="fp32"):
    """Tensor-core FLOPs and the bytes each t2r kernel must move (inputs read once, outputs written
    once) at B x T, by kernel name, for the intermediates' storage `store` (as on the GPU: "auto" is
    "probs"). Factored intra-chunk path; NT = key + value tiles of the split input-gradient kernel."""
    store = "probs" if store == "auto" else store
    tok = B * T
    nch = tok // C
    pc = nch * H  # (chunk, kv head) pairs
    n_snap = B * (T // C + 1)
    qb, kb, sb = tok * HQ * D * 2, tok * H * D * 2, tok * H * M * 2  # bf16 [., HQ, D], [., H, D], [., H, M]
    ub = n_snap * H * 2 * D * M * 4  # both states' chunk contributions, fp32 (scan input)
    snapb = ub // (1 if store == "fp32" else 2)  # the states (or their gradients) as stored
    pb = tok * HQ * M * (2 if store in ("probs", "input") else 4)  # slot probabilities
    dyb = tok * HQ * M * (2 if store == "input" else 4)  # logit gradients
    actb = (pb + dyb) / 2  # one of p or dY (the kernels below read one of each)
    rb = tok * H * M * 4  # one fp32 [., H, M] plane
    f = {  # name: (FLOPs, bytes)
        "_local_fwd_kernel": (pc * 2 * C * 2 * D * M, 2 * kb + 2 * sb + ub),
        "_scan_fwd_kernel": (0, ub + snapb),
        "_fwd_o_kernel": (pc * G * 2 * C * (2 * C * D + 2 * D * M + 2 * C * M), 2 * qb + 2 * kb + 2 * sb + snapb),
        "_bwd_prep_kernel": (pc * G * 2 * C * (2 * C * D + 2 * D * M + 2 * C * M),
                             2 * qb + 2 * kb + 2 * sb + snapb + 2 * actb + rb),
        "_local_bwd_kernel": (pc * G * 2 * C * (2 * D * M + 2 * C * D + 2 * C * M),
                              2 * qb + 2 * actb + 2 * kb + sb + ub + 4 * rb),
        "_scan_bwd_kernel": (0, ub + snapb),
        "_bwd_dqkv_kernel": (pc * (G * 2 * C * (2 * C * M + D * M + 3 * C * D) + 4 * 2 * C * D * M),
                             3 * qb + 2 * actb + 4 * kb + 2 * sb + 2 * snapb + NT * rb),
        "_bwd_finish_kernel": (0, 4 * sb + (5 + NT) * rb),
    }
    return f


def profile_step(T, steps=5):
    """Per-kernel GPU time of one t2r forward+backward at B x T (torch.profiler, mean over `steps`),
    against each kernel's FLOP and byte floors, for the current CONFIG."""
    from t2r.kernels.gsa import chunk_gsa
    from t2r.kernels.gsa import _triton_chunk as ct

    B = TOKENS // T
    x = inputs(B, T, seed=1)
    do = torch.randn(B, T, HQ, D, device=DEV, dtype=DT)
    xs = leaves(x)

    def step():
        o, _ = chunk_gsa(*xs, backend="triton")
        o.backward(do)
        for t in xs:
            t.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times: dict = {}
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            name = e.name if e.name.startswith("_") else "torch: " + e.name.split("(")[0][-60:]
            times[name] = times.get(name, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
    C = ct.CONFIG["chunk"]
    tile = min(ct.CONFIG.get("tile", 64), D)
    floors = kernel_floors(B, T, C, 2 * (D // tile), ct.CONFIG["store"])
    out = {}
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        fl, by = floors.get(name, (None, None))
        out[name] = {"ms": ms, "flop_floor_ms": None if fl is None else fl / 800e12 * 1e3,
                     "byte_floor_ms": None if by is None else by / 4.3e12 * 1e3,
                     "tflops": None if not fl else fl / ms / 1e9, "gbps": None if by is None else by / ms / 1e6}
    return out


# -------------------------------------------------------------------------------------- decoding

def decode_rows(skip_fla):
    from t2r.kernels.gsa import fused_recurrent_gsa, naive_recurrent_gsa
    from triton.testing import do_bench_cudagraph

    rows = {}
    for B in (1, 16, 64):
        x = inputs(B, 1, seed=B)
        h0 = (torch.randn(B, H, D, M, device=DEV), torch.randn(B, H, M, D, device=DEV))
        row = {"state_bytes_ours": H * M * 2 * D * 4, "state_bytes_fla": HQ * M * 2 * D * 4}
        ro, _ = naive_recurrent_gsa(*[t.float() for t in x], initial_state=h0, output_final_state=True)
        with torch.no_grad():
            o, _ = fused_recurrent_gsa(*x, initial_state=h0, output_final_state=True, backend="triton")
            row["ours_err"] = rel(o, ro)
            step = lambda: fused_recurrent_gsa(*x, initial_state=h0, output_final_state=True,  # noqa: E731
                                               backend="triton")
            row["ours"] = bench(step)
            try:
                row["ours_graph"] = do_bench_cudagraph(step)
            except Exception as e:
                row["ours_graph_error"] = repr(e)[:200]
            if not skip_fla:
                try:
                    from fla.ops.gsa import fused_recurrent_gsa as fla_rec

                    fx = [x[0]] + [rep(t) for t in x[1:]]
                    fh = tuple(t.repeat_interleave(G, dim=1) for t in h0)
                    fo, _ = fla_rec(*fx, initial_state=fh, output_final_state=True)
                    row["fla_err"] = rel(fo, ro)
                    fstep = lambda: fla_rec(*fx, initial_state=fh, output_final_state=True)  # noqa: E731
                    row["fla"] = bench(fstep)
                    try:
                        row["fla_graph"] = do_bench_cudagraph(fstep)
                    except Exception as e:
                        row["fla_graph_error"] = repr(e)[:200]
                    # fla 0.6.0's single-token inference path also takes kv heads directly
                    go, _ = fla_rec(*x, initial_state=h0, output_final_state=True)
                    row["fla_gqa_err"] = rel(go, ro)
                    row["fla_gqa"] = bench(lambda: fla_rec(*x, initial_state=h0, output_final_state=True))
                except Exception as e:
                    row["fla_error"] = repr(e)[:300]
                    traceback.print_exc()
            for L in (4096, 32768):
                try:
                    qs = x[0].transpose(1, 2).contiguous()
                    kc = torch.randn(B, H, L, D, device=DEV, dtype=DT)
                    vc = torch.randn(B, H, L, D, device=DEV, dtype=DT)
                    att = lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)  # noqa: E731
                    if B == 1:
                        ref = F.scaled_dot_product_attention(qs.float(), kc.float().repeat_interleave(G, 1),
                                                             vc.float().repeat_interleave(G, 1))
                        row[f"sdpa_{L}_err"] = rel(att(), ref)
                    row[f"sdpa_{L}"] = bench(att)
                    row[f"kv_bytes_{L}"] = 2 * H * L * D * 2
                    del kc, vc
                except Exception as e:
                    row[f"sdpa_{L}_error"] = repr(e)[:300]
                torch.cuda.empty_cache()
        rows[B] = row
        log(f"decode B={B}: {json.dumps(row)}")
    return rows


# ----------------------------------------------------------------------------------------- report

def fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def tables(gpu, versions):
    lines = [f"GSA kernels, Mistral-7B attention shapes (HQ={HQ}, H={H}, head dim {D}, M={M}, bf16), "
             f"{gpu}, {versions}, {datetime.date.today().isoformat()}", "",
             "Training (ms, median of triton.testing.do_bench; speedup = other / ours):", "",
             "| B x T | ours fwd | fla fwd | SDPA fwd | ours fwd+bwd | fla fwd+bwd | SDPA fwd+bwd "
             "| vs fla (fwd+bwd) | vs SDPA (fwd+bwd) | vs SDPA (fwd) | ours err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for T, r in RESULTS["train"].items():
        err = fmt(r.get("ours_err"), 4) if "ours_grad_err" not in r else \
            f"{r['ours_err']:.1e} / grads {r['ours_grad_err']:.1e}"
        lines.append(f"| {r['B']} x {T} | {fmt(r.get('ours_fwd'))} | {fmt(r.get('fla_fwd'))} | "
                     f"{fmt(r.get('sdpa_fwd'))} | {fmt(r.get('ours_fwdbwd'))} | {fmt(r.get('fla_fwdbwd'))} | "
                     f"{fmt(r.get('sdpa_fwdbwd'))} | {ratio(r.get('fla_fwdbwd'), r.get('ours_fwdbwd'))} | "
                     f"{ratio(r.get('sdpa_fwdbwd'), r.get('ours_fwdbwd'))} | "
                     f"{ratio(r.get('sdpa_fwd'), r.get('ours_fwd'))} | {err} |")
    lines += ["", "SDPA (causal) by backend, fwd / fwd+bwd ms (the training table takes the fastest; "
              "efficient attends over k/v repeated to the query heads):", "",
              "| B x T | " + " | ".join(SDPA_BACKENDS) + " | fastest |", "|---|" + "---|" * (len(SDPA_BACKENDS) + 1)]
    for T, r in RESULTS["train"].items():
        cells = [f"{fmt(r.get(f'sdpa_{n}_fwd'))} / {fmt(r.get(f'sdpa_{n}_fwdbwd'))}"
                 if r.get(f"sdpa_{n}_fwdbwd") else ("failed" if f"sdpa_{n}_error" in r else "-")
                 for n in SDPA_BACKENDS]
        lines.append(f"| {r['B']} x {T} | " + " | ".join(cells) + f" | {r.get('sdpa_best', '-')} |")
    lines += ["", "Decoding, one new token per sequence (ms; graph = CUDA-graph replay; state per sequence and "
              "layer: ours fp32 one pair per kv head, fla one per query head):", "",
              "| batch | ours | ours graph | fla (32 heads) | fla graph | fla 0.6 GQA path | SDPA 4k cache "
              "| SDPA 32k cache | vs fla | state ours | state fla | KV cache 4k / 32k |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for B, r in RESULTS["decode"].items():
        kv = f"{r.get('kv_bytes_4096', 0) / 2**20:.0f} / {r.get('kv_bytes_32768', 0) / 2**20:.0f} MiB"
        lines.append(f"| {B} | {fmt(r.get('ours'), 4)} | {fmt(r.get('ours_graph'), 4)} | {fmt(r.get('fla'), 4)} | "
                     f"{fmt(r.get('fla_graph'), 4)} | {fmt(r.get('fla_gqa'), 4)} | {fmt(r.get('sdpa_4096'), 4)} | "
                     f"{fmt(r.get('sdpa_32768'), 4)} | {ratio(r.get('fla'), r.get('ours'))} | "
                     f"{r['state_bytes_ours'] / 2**10:.0f} KiB | {r['state_bytes_fla'] / 2**10:.0f} KiB | {kv} |")
    if RESULTS["gates"]:
        lines += ["", "Our chunk kernels by kind of forget gate (ms; share of (chunk, kv head) blocks per regime; "
                  "vs normal = fwd+bwd of the random ('normal') gates at the same shape / this one's; heads: "
                  "query/kv):", "",
                  "| gates | B x T | factored | blocked | pairwise | fwd | fwd+bwd | vs normal | err "
                  "| baseline fwd+bwd | vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, r in RESULTS["gates"].items():
            base = RESULTS["gates"].get(f"normal:{kind.split(':')[1]}" if ":" in kind else "normal", {}).get("fwdbwd")
            lines.append(f"| {kind} ({r['heads']} heads) | {r['B']} x {r['T']} | {r['factored']:.0%} | "
                         f"{r['blocked']:.0%} | {r['pairwise']:.0%} | {fmt(r.get('fwd'))} | {fmt(r.get('fwdbwd'))} | "
                         f"{ratio(base, r.get('fwdbwd'))} | {r['err']:.1e} | {fmt(r.get('base_fwdbwd'))} | "
                         f"{ratio(r.get('base_fwdbwd'), r.get('fwdbwd'))} |")
    for cfg_name, bd in RESULTS["breakdown"].items():
        total = sum(r["ms"] for r in bd.values())
        lines += ["", f"Per kernel, one forward+backward at 8 x 2048, configuration `{cfg_name}` (torch.profiler, "
                  f"{total:.3f} ms of kernels; floors: 800 TFLOP/s bf16, 4.3 TB/s):", "",
                  "| kernel | ms | TFLOP/s | GB/s | FLOP floor ms | byte floor ms |", "|---|---|---|---|---|---|"]
        for name, r in bd.items():
            lines.append(f"| {name} | {r['ms']:.3f} | {fmt(r['tflops'], 0)} | {fmt(r['gbps'], 0)} | "
                         f"{fmt(r['flop_floor_ms'])} | {fmt(r['byte_floor_ms'])} |")
    if RESULTS["sweep"]:
        lines += ["", "Configurations (ms; errors: output / worst gradient, where checked):", "",
                  "| configuration | B x T | fwd | fwd+bwd | err |", "|---|---|---|---|---|"]
        for name, rows in RESULTS["sweep"].items():
            for T, r in rows.items():
                err = "-" if "ours_err" not in r else (f"{r['ours_err']:.1e}" + (
                    f" / {r['ours_grad_err']:.1e}" if r.get("ours_grad_err") is not None else ""))
                lines.append(f"| {name} | {r.get('B', '-')} x {T} | {fmt(r.get('ours_fwd'))} | "
                             f"{fmt(r.get('ours_fwdbwd'))} | {r.get('error', err)} |")
    return "\n".join(lines)


# Kernel configurations the sweep times against the default (_triton_chunk.CONFIG): name, changes,
# whether to time it at every T of the run (else at the first only). In order of interest: the
# budget (--budget-s) drops the last ones first.
SWEEP = [
    ("store_fp32", {"store": "fp32"}, True),
    ("store_states", {"store": "states"}, False),
    ("store_input", {"store": "input"}, False),
    ("finish_w8", {"warps_finish": 8}, False),
    ("scan_be512", {"scan_be": 512}, False),
    ("stages2_fp32_finish_w8", {"stages_prep": 2, "stages_local": 2, "stages_split": 2, "store": "fp32",
                                "warps_finish": 8}, False),
]


SCAN_DEFAULT: tuple = ()


def use_config(change, base=None):
    """Apply one SWEEP change (kernel CONFIG keys, plus scan_nb / scan_be: the state scans' chunks per
    step and elements per program), or with change=None restore `base` and the scan defaults."""
    from t2r.kernels.gsa import _triton_chunk_state as cs
    from t2r.kernels.gsa import _triton_chunk

    global SCAN_DEFAULT
    if not SCAN_DEFAULT:
        SCAN_DEFAULT = (cs.SCAN_NB, cs.SCAN_BE)
    if change is None:
        _triton_chunk.CONFIG.clear()
        _triton_chunk.CONFIG.update(base)
        cs.SCAN_NB, cs.SCAN_BE = SCAN_DEFAULT
        return
    _triton_chunk.CONFIG.update({k: v for k, v in change.items() if not k.startswith("scan_")})
    cs.SCAN_NB = change.get("scan_nb", SCAN_DEFAULT[0])
    cs.SCAN_BE = change.get("scan_be", SCAN_DEFAULT[1])


def seed_triton_cache(archive: str) -> None:
    """Unpack autotuning results (*.autotune.json, as Triton writes them under TRITON_CACHE_AUTOTUNING=1)
    into the Triton cache; entries from another Triton or GPU are simply never hit."""
    import tarfile

    from triton import knobs

    cache = knobs.cache.dir or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    if not os.path.isfile(archive):
        log(f"fla autotuning results {archive}: not found, fla autotunes on its first call")
        return
    os.makedirs(cache, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".autotune.json")]
        tar.extractall(cache, members=members, filter="data")
    log(f"seeded {cache} with {len(members)} autotuning results from {archive}")


def save(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP kernel configurations")
    ap.add_argument("--breakdown", action="store_true",
                    help="per-kernel times (torch.profiler) at the first T for --breakdown-configs")
    ap.add_argument("--breakdown-configs", default="default",
                    help="comma-separated configurations to profile: default or SWEEP names")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip the remaining sweep configurations after this many seconds")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--fla-autotune", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_data",
                                                           "fla-0.6.0-autotune-h200-triton-3.6.tgz"),
                    help="fla's autotuning results (Triton cache files) to seed the Triton cache with before "
                         "timing fla; the default holds the H200 / triton 3.6 results of 2026-11-28 ('' for none)")
    ap.add_argument("--fla-seconds", type=int, default=150,
                    help="stop timing fla's training kernels after this long (its first call autotunes)")
    ap.add_argument("--ts", default=None)
    ap.add_argument("--gates", default="", help="comma-separated kinds of gate to time the chunk kernels under at "
                    f"the first T: {', '.join(GATE_KINDS)}")
    ap.add_argument("--real-gates", default=None, help="a model's gates (scripts/gate_regimes.py --save) to time "
                    "the chunk kernels on, in the --gates table")
    ap.add_argument("--baseline", default=None, help="with --gates / --real-gates: also time this other t2r "
                    "checkout's kernels")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    args = ap.parse_args()
    global HQ, H, D, M, G, TOKENS, TS, DEV
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        HQ, H, D, M, G, TOKENS, TS, DEV = 8, 2, 16, 16, 4, 256, [128, 256], "cpu"
    ts = [int(t) for t in args.ts.split(",")] if args.ts else TS
    kinds = [k for k in args.gates.split(",") if k]
    if set(kinds) - set(GATE_KINDS):
        ap.error(f"--gates: unknown {sorted(set(kinds) - set(GATE_KINDS))}; choose from {', '.join(GATE_KINDS)}")
    known = {"default", *(n for n, _, _ in SWEEP)}
    unknown = set(args.breakdown_configs.split(",")) - known
    if unknown:
        ap.error(f"--breakdown-configs: unknown {sorted(unknown)}; choose from {sorted(known)}")
    import triton

    from t2r.kernels.gsa import _triton_chunk

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    try:
        import fla

        fla_v = getattr(fla, "__version__", "?")
    except Exception:
        fla_v = "absent"
    versions = f"torch {torch.__version__}, triton {triton.__version__}, fla {fla_v}"
    log(versions, gpu)
    t0 = time.time()
    first = time.time()
    for T in ts:
        try:
            RESULTS["train"][T] = train_row(T, check_grads=(T == ts[0]))
        except Exception as e:
            RESULTS["errors"][f"train_{T}"] = repr(e)[:300]
            traceback.print_exc()
        log(f"train T={T} ({time.time() - t0:.0f}s): {json.dumps(RESULTS['train'].get(T))}")
        if T == ts[0]:
            RESULTS["first_train_call_s"] = time.time() - first
    try:
        if not args.no_decode:
            RESULTS["decode"] = decode_rows(args.skip_fla)
    except Exception as e:
        RESULTS["errors"]["decode"] = repr(e)[:300]
        traceback.print_exc()
    if kinds or args.real_gates:
        try:
            RESULTS["gates"] = gate_rows(ts[0], kinds, load_baseline_kernels(args.baseline) if args.baseline else None,
                                         args.real_gates)
        except Exception as e:
            RESULTS["errors"]["gates"] = repr(e)[:300]
            traceback.print_exc()
    save(args.out)
    if args.breakdown and DEV == "cuda":
        base = dict(_triton_chunk.CONFIG)
        named = {"default": {}, **{n: c for n, c, _ in SWEEP}}
        for name in args.breakdown_configs.split(","):
            change = named[name]
            use_config(change)
            try:
                RESULTS["breakdown"][name] = profile_step(ts[0])
                log(f"breakdown {name}: {json.dumps(RESULTS['breakdown'][name])}")
            except Exception as e:
                RESULTS["errors"][f"breakdown_{name}"] = repr(e)[:300]
                traceback.print_exc()
            use_config(None, base)
        RESULTS["kernels"] = kernel_stats()
        log("kernels:", json.dumps(RESULTS["kernels"]))
        save(args.out)
    log("\n" + tables(gpu, versions))
    if args.sweep:
        base = dict(_triton_chunk.CONFIG)
        for name, change, every_t in SWEEP:
            if time.time() - t0 > args.budget_s:
                log(f"sweep {name}: skipped (budget)")
                continue
            use_config(change)
            RESULTS["sweep"][name] = {}
            for T in (ts if every_t else ts[:1]):
                try:
                    r = train_row(T, check_grads=(T == ts[0]), sdpa=False)
                    RESULTS["sweep"][name][T] = {k: r.get(k) for k in ("B", "ours_fwd", "ours_fwdbwd", "ours_err",
                                                                         "ours_grad_err")}
                except Exception as e:
                    RESULTS["sweep"][name][T] = {"error": repr(e)[:300]}
                    traceback.print_exc()
                log(f"sweep {name} T={T} ({time.time() - t0:.0f}s): {json.dumps(RESULTS['sweep'][name][T])}")
            use_config(None, base)
            save(args.out)
    if not args.skip_fla:
        import signal

        if args.fla_autotune:
            seed_triton_cache(args.fla_autotune)

        def alarm(*_):
            raise TimeoutError("fla budget spent")

        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(args.fla_seconds)
        t1 = time.time()
        try:
            for T in ts:
                fla_row(T, RESULTS["train"][T])
                log(f"fla T={T} ({time.time() - t1:.0f}s): {json.dumps(RESULTS['train'][T])}")
                save(args.out)
                if T == ts[0]:
                    RESULTS["fla_first_call_s"] = time.time() - t1
        except Exception as e:
            RESULTS["errors"]["fla_train"] = repr(e)[:300]
            log("fla stopped:", repr(e)[:300])
        signal.alarm(0)
    RESULTS["meta"] = {"gpu": gpu, "versions": versions, "date": datetime.date.today().isoformat(),
                       "config": dict(_triton_chunk.CONFIG), "seconds": time.time() - t0}
    save(args.out)
    table = tables(gpu, versions)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table + "\n")
    log("\n" + table)


if __name__ == "__main__":
    main()
