"""Peak memory and time of the finetune losses (cross-entropy + KL to the teacher, forward and backward):
the plain fp32-logits computation (loss.fused: off), the chunked torch one (chunked; compiled: its chunks
under torch.compile, as with model.compile) and liger-kernel's fused linear kernels (liger, on CUDA when
installed).

SmolLM2-135M's shape by default: hidden 576, vocabulary 49152, 8 x 2048 tokens. As in a full finetune
with its frozen teacher: the student's final hidden states (fp32) and lm_head (fp32, trained), the
teacher's in bf16, bf16 autocast on CUDA. Each method's losses and gradients are checked against the
plain ones before it is timed.

    python scripts/bench_losses.py                          # on a GPU
    python scripts/bench_losses.py --small                  # on a CPU: 2048 tokens, vocabulary 8192

GFLOP: the matmul work of one forward and backward (torch.utils.flop_counter; not counted for
compiled, whose matmuls are chunked's). Memory is the peak above what was allocated before the first
step (so it counts the gradients too; CUDA: the caching allocator's peak; CPU: the growth of the
process's peak resident size, each method in a fresh process with glibc's MALLOC_MMAP_THRESHOLD_
lowered, which slows it). Time is the median of --repeat steps after one warm-up.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2r.train.losses import kl_sum, liger_losses_module, next_token_losses  # noqa: E402


def make(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = args.tokens, args.hidden, args.vocab
    head = torch.nn.Linear(d, v, bias=False).to(device)
    teacher_head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g) * 0.05)
        teacher_head.weight.copy_(head.weight.cpu() + 0.005 * torch.randn(v, d, generator=g))
    teacher_head = teacher_head.to(device, torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(n, d, generator=g).to(device).requires_grad_()
    teacher_hidden = (hidden.detach().cpu() + 0.1 * torch.randn(n, d, generator=g)).to(device, torch.bfloat16)
    target = torch.randint(0, v, (n,), generator=g)
    target[:: args.seq_len] = -100  # one position a row predicts nothing
    return hidden, head, target.to(device), teacher_hidden, teacher_head


def plain(hidden, head, target, teacher_hidden, teacher_head, t):
    """What stage_loss_sum computes with loss.fused: off."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    valid = target != -100
    return ce, kl_sum(logits[valid], teacher_logits[valid], t)


def step(method, args, tensors):
    hidden, head, target, teacher_hidden, teacher_head = tensors
    hidden.grad = head.weight.grad = None
    device = hidden.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        if method == "plain":
            ce, kl = plain(hidden, head, target, teacher_hidden, teacher_head, args.temperature)
            loss = ce + args.kl_weight * kl
        else:
            loss, ce, kl = next_token_losses(hidden, head, target, teacher_hidden, teacher_head, args.temperature,
                                             args.kl_weight, how="chunked" if method == "compiled" else method,
                                             chunk_size=args.chunk_size, compiled=method == "compiled")
        loss.backward()
    return ce.detach(), kl.detach()


def measure(method, args, device) -> dict:
    tensors = make(args, device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # a step on a few tokens first: the libraries' one-time buffers are not the method's
    hidden, head, target, teacher_hidden, teacher_head = tensors
    step(method, args, (hidden[:64].detach().requires_grad_(), head, target[:64], teacher_hidden[:64], teacher_head))
    head.weight.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # a process's peak resident size never falls: the base is taken before the first step
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ce, kl = step(method, args, tensors)  # warm-up (and the values)
    grads = (tensors[0].grad.clone(), tensors[1].weight.grad.clone())
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step(method, args, tensors)
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    flops = None
    if method != "compiled":  # compiled code calls its matmuls past the dispatcher, so it would count none
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:  # one more step, untimed: its matmuls' work
            step(method, args, tensors)
        flops = counter.get_total_flops()
    return {"method": method, "ce": ce.item(), "kl": kl.item(), "peak_gib": peak / 2**30,
            "ms": 1e3 * statistics.median(times), "gflop": None if flops is None else flops / 1e9, "grads": grads}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-weight", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--methods", default="plain,chunked,compiled,liger",
                   help="comma-separated; compiled: chunked with its chunks under torch.compile (model.compile)")
    p.add_argument("--small", action="store_true", help="a CPU-sized shape: 2048 tokens, vocabulary 8192")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one method, in a child process (CPU memory)
    args = p.parse_args()
    if args.small:
        args.tokens, args.seq_len, args.vocab, args.repeat = 2048, 512, 8192, min(args.repeat, 3)
    torch.manual_seed(0)
    if args.only:
        r = measure(args.only, args, args.device)
        torch.save(r, sys.stdout.buffer)
        return
    methods = args.methods.split(",")
    if "liger" in methods and (args.device != "cuda" or liger_losses_module()[0] is None):
        print(f"liger: skipped ({'not on CUDA' if args.device != 'cuda' else liger_losses_module()[1]})")
        methods.remove("liger")
    print(f"tokens {args.tokens}, hidden {args.hidden}, vocabulary {args.vocab}, chunk {args.chunk_size}, "
          f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f"; one fp32 copy of the logits: {args.tokens * args.vocab * 4 / 2**30:.2f} GiB", flush=True)
    results = []
    for m in methods:
        if args.device == "cuda":
            r = measure(m, args, "cuda")
            torch.cuda.empty_cache()
        else:  # a fresh process each, so the peak resident size is this method's own
            # every large allocation its own mapping, returned when freed (glibc would keep freed
            # blocks of up to 32 MiB in its heap): the resident size then follows what is live
            cmd = [sys.executable, *sys.argv, "--only", m]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, capture_output=True, check=True, env=env).stdout
            r = torch.load(io.BytesIO(out), weights_only=False)
        results.append(r)
    ref = results[0]
    print(f"{'method':8} {'peak GiB':>9} {'ms/step':>9} {'GFLOP':>8} {'ce':>14} {'kl':>12} {'d(grad h)':>10} "
          f"{'d(grad W)':>10}")
    for r in results:
        dh, dw = (float((a.float() - b.float()).norm() / b.float().norm())
                  for a, b in zip(r["grads"], ref["grads"]))
        gflop = "-" if r["gflop"] is None else f"{r['gflop']:.1f}"
        print(f"{r['method']:8} {r['peak_gib']:9.3f} {r['ms']:9.1f} {gflop:>8} {r['ce']:14.4f} {r['kl']:12.6f} "
              f"{dh:10.2e} {dw:10.2e}")
        r.update(rel_grad_hidden=dh, rel_grad_head=dw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [{k: v for k, v in r.items() if k != "grads"} for r in results]},
                      f, indent=1)


if __name__ == "__main__":
    main()
