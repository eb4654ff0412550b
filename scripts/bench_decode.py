"""Decoding speed and memory: a teacher against its GSA conversion, dynamic and static (CUDA-graphed) paths.

For each batch size and prompt length (random tokens, no padding), every path makes the same number of
new tokens, greedily:

- ``teacher``: the teacher as transformers runs it, ``generate`` with its KV cache (DynamicCache);
- ``t2r dynamic``: the converted model, ``generate`` with its T2RCache (tensors made anew each step);
- ``t2r static``: ``generate(cache=T2RStaticCache)``: buffers written in place, each step a CUDA graph;
- ``t2r static loop``: ``t2r.generation.static_generate`` (the same graphed step, t2r's own loop: no
  logits processors, no host synchronisation between steps).

Columns: prefill seconds (the prompt to the first new token), decode tokens/s (all rows, after the first
token), peak GPU memory above the weights (GiB), the cache held at the end (MiB), each as a ratio to the
teacher's, and ``agree``: the share of tokens each t2r path makes before it first differs from the
dynamic path (1.00: the same tokens). The converted models are fresh conversions (untrained new
parameters): speed and memory do not depend on training. Each path first runs a short warm-up (Triton
compilation, graph capture) at each batch size; a static cache is made once per batch size and reused.

    python scripts/bench_decode.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --batches 1,16,64 --prompts 4096,32768 --new-tokens 128 --windows 0,64
    python scripts/bench_decode.py --tiny        # CPU, a tiny random model: the script's logic, not a timing
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2r.convert import ConversionOptions, convert_model, load_teacher  # noqa: E402
from t2r.generation import static_generate  # noqa: E402
from t2r.hub import resolve_model  # noqa: E402
from t2r.models import T2RCache, T2RStaticCache, output_cache  # noqa: E402
from t2r.models.modeling_t2r import CACHE_OUTPUT_KEY  # noqa: E402  (generate's name for a cache argument)

GIB, MIB = 2 ** 30, 2 ** 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """A streamer that notes when each put arrives: the prompt first, then each new token (transformers
    puts them on the host, a synchronisation it makes every step anyway to check for the end)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def cache_nbytes(cache) -> int:
    if isinstance(cache, T2RCache):
        return cache.nbytes()
    layers = getattr(cache, "layers", None) or []  # transformers' DynamicCache
    return sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None),
                                                                           getattr(layer, "values", None))
               if torch.is_tensor(t))


def peak_above(device, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - base) / GIB if device.type == "cuda" else None


def fresh(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_generate(model, ids, new_tokens, base, **kw) -> dict:
    """transformers' generate, timed through a streamer."""
    device = ids.device
    fresh(device)
    clock = Clock()
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, streamer=clock, return_dict_in_generate=True, **kw)
    sync(device)
    first, last = clock.times[1], time.perf_counter()
    tokens = out.sequences[:, ids.shape[1]:]
    return dict(prefill=first - start, decode=ids.shape[0] * (new_tokens - 1) / (last - first),
                peak=peak_above(device, base), cache=cache_nbytes(output_cache(out)) / MIB, tokens=tokens.cpu())


def run_loop(model, ids, new_tokens, base, cache) -> dict:
    """static_generate: once for the first token (the prefill), once for all of them."""
    device = ids.device
    fresh(device)
    times = []
    for n in (1, new_tokens):
        sync(device)
        start = time.perf_counter()
        tokens = static_generate(model, ids, max_new_tokens=n, cache=cache)
        sync(device)
        times.append(time.perf_counter() - start)
    decode = ids.shape[0] * (new_tokens - 1) / (times[1] - times[0])
    return dict(prefill=times[0], decode=decode, peak=peak_above(device, base), cache=cache.nbytes() / MIB,
                tokens=tokens.cpu())


def agree(tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of the share of tokens made before the first difference from ``ref``."""
    same = (tokens == ref).long().cumprod(-1)
    return float(same.sum(-1).float().mean() / tokens.shape[1])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| model | path | batch | prompt | prefill s | decode tok/s | peak GiB | cache MiB | prefill x | "
            "decode x | peak x | cache x | agree |")
    lines = [head, "|" + "---|" * 13]
    teacher = {(r["batch"], r["prompt"]): r for r in rows if r["path"] == "teacher" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | {r['prompt']} | {r['error']} |" + " |" * 9)
            continue
        t = teacher.get((r["batch"], r["prompt"]))

        def ratio(key):
            if t is None or r[key] is None or t[key] in (None, 0):
                return "-"
            return f"{r[key] / t[key]:.2f}"
        lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | {r['prompt']} | {r['prefill']:.3f} | "
                     f"{r['decode']:,.0f} | {fmt(r['peak'], '.2f')} | {r['cache']:,.1f} | {ratio('prefill')} | "
                     f"{ratio('decode')} | {ratio('peak')} | {ratio('cache')} | {fmt(r.get('agree'), '.2f')} |")
    return "\n".join(lines)


def measure(name, model, paths, args, device, rows):
    """Every (batch, prompt) of ``paths`` for one model on the device."""
    model.to(device)
    fresh(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    vocab = model.config.vocab_size
    for batch in args.batches:
        static = None
        if "t2r static" in paths:  # one per batch size, for the longest prompt: graphs captured once
            static = T2RStaticCache(model.config, batch, max(args.prompts) + args.new_tokens)
        warm = torch.randint(0, vocab, (batch, min(32, *args.prompts)), device=device)
        for path in paths:  # warm-up: kernels compiled, graphs captured at this batch size
            if path == "t2r static loop":
                static_generate(model, warm, max_new_tokens=4, cache=static)
            else:
                kw = {CACHE_OUTPUT_KEY: static} if path == "t2r static" else {}
                if static is not None:
                    static.reset()
                model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, **kw)
        for prompt in args.prompts:
            ids = torch.randint(0, vocab, (batch, prompt), device=device)
            ref = None
            for path in paths:
                row = dict(model=name, path=path, batch=batch, prompt=prompt)
                try:
                    with torch.no_grad():
                        if path == "t2r static loop":
                            row.update(run_loop(model, ids, args.new_tokens, base, static))
                        else:
                            if static is not None:
                                static.reset()
                            kw = {CACHE_OUTPUT_KEY: static} if path == "t2r static" else {}
                            row.update(run_generate(model, ids, args.new_tokens, base, **kw))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                if "tokens" in row:
                    if path == "t2r dynamic":
                        ref = row["tokens"]
                    elif path.startswith("t2r") and ref is not None:
                        row["agree"] = agree(row["tokens"], ref)
                    del row["tokens"]
                rows.append(row)
                log(row)
        del static
    model.to("cpu")
    fresh(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="teacher: alias, Hub id, folder or .gguf (default smollm2-135m)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,16,64)")
    p.add_argument("--prompts", default=None, help="prompt lengths in tokens (default 4096,32768)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 128)")
    p.add_argument("--windows", default=None, help="conversions to time, by window_size: 0 pure GSA, 64 the hybrid "
                   "(default 0,64)")
    p.add_argument("--mixers", default="gsa", help="mixers to convert to, each at every --windows: gsa, gla, linear "
                   "(default gsa)")
    p.add_argument("--skip-teacher", action="store_true", help="time only the converted models (no ratios)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU at a tiny shape (a smoke test; "
                   "defaults tiny-random-llama, batches 1,2, prompts 16,40, 6 new tokens, windows 0,8)")
    args = p.parse_args(argv)
    defaults = (("tiny-random-llama", "1,2", "16,40", 6, "0,8") if args.tiny
                else ("smollm2-135m", "1,16,64", "4096,32768", 128, "0,64"))
    for name, value in zip(("model", "batches", "prompts", "new_tokens", "windows"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches, args.prompts = ([int(x) for x in s.split(",")] for s in (args.batches, args.prompts))
    windows = [int(x) for x in args.windows.split(",")]
    torch.manual_seed(0)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = "fp32" if device.type == "cpu" else "bf16"
    teacher, _ = load_teacher(resolve_model(args.model), dtype)
    teacher.eval()
    log(f"{args.model}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M parameters, {dtype}, {device}")
    rows: list[dict] = []
    if not args.skip_teacher:
        measure("teacher", teacher, ["teacher"], args, device, rows)
    for mixer in args.mixers.split(","):
        for w in windows:
            options = ConversionOptions(mixer=mixer, window_size=w, dtype=dtype)
            model = convert_model(copy.deepcopy(teacher), options).eval()
            name = f"{mixer} window {w}" if w else mixer
            measure(name, model, ["t2r dynamic", "t2r static", "t2r static loop"], args, device, rows)
            del model
    print(f"\n{args.model}, {dtype} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{args.new_tokens} new tokens per row; ratios to the teacher at the same batch and prompt\n")
    print(table(rows))


if __name__ == "__main__":
    main()
