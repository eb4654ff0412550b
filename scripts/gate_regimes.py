"""How often a model's GSA gates send the Triton kernels down their slower exact paths, on real text.

Inside a chunk of 64 tokens the kernels evaluate the decays exp(b_t - b_i) (b: the cumulative log
forget gate from the chunk start) in one of three ways per (chunk, kv head) block
(kernels/gsa/_triton_intra.py, kernels/gsa/utils.py:chunk_regimes): factored, one tensor-core product,
when every |b - r| of the block stays within THRESH, r being b at the chunk's middle row; blocked, one
product per sub-block of 16 key rows, when that holds inside every sub-block; else pairwise, a loop over
the chunk's key positions, exact for any gate and several times slower. Random gates (the kernel
benchmarks) stay factored; converted models' gates may not. This prints, per layer, the share of
(row, chunk, kv head) blocks in the blocked and the pairwise form, and the gates' mean log value.

    python scripts/gate_regimes.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf      # fresh conversion
    python scripts/gate_regimes.py --model OUTPUT/model                              # a trained one

--save PATH keeps the gates of the first row (every layer, bf16) with the model's head counts, for
`scripts/bench_kernels.py --real-gates PATH` to time the kernels on them on a GPU machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2r.kernels.gsa.utils import BLOCKED, PAIRWISE, THRESH, chunk_regimes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a t2r folder or run output, or a teacher (converted with "
                    "configs/smollm2-135m-gsa.yaml's conversion)")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--save", default=None, help="write the first row's gates of every layer here (torch.save)")
    args = ap.parse_args(argv)
    import yaml

    from t2r.convert import ConversionOptions, convert_model, load_teacher
    from t2r.eval.command import eval_rows, load_model_any
    from t2r.hub import resolve_model
    from t2r.layers.gsa import GatedSlotAttention

    folder = args.model if os.path.isdir(os.path.join(args.model, "model")) else args.model  # a run's OUTPUT
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config) and '"t2r"' in open(config).read() or os.path.isdir(os.path.join(folder, "model")):
        model, tokenizer = load_model_any(args.model, torch.device("cpu"), "fp32")
    else:
        conv = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                "smollm2-135m-gsa.yaml")))["model"]["conversion"]
        teacher, tokenizer = load_teacher(resolve_model(args.model), "fp32")
        model = convert_model(teacher, ConversionOptions(**conv, dtype="fp32"))
    model.eval()
    gates = {}

    def keep(layer):
        inputs = layer.gsa_inputs

        def wrapped(x, ctx):
            out = inputs(x, ctx)
            gates.setdefault(layer.layer_idx, []).append(out[0][4].float())  # g [B, T, H, M]
            return out
        layer.gsa_inputs = wrapped

    for m in model.modules():
        if isinstance(m, GatedSlotAttention):
            keep(m)
    rows = eval_rows("python-stdlib", tokenizer, args.seq_len, args.rows)
    with torch.no_grad():
        for r in rows:
            model(torch.tensor([r["input_ids"]]), use_cache=False)
    C = args.chunk
    print(f"{args.model}: {len(rows)} rows x {args.seq_len} tokens of held-out stdlib text, chunk {C}, "
          f"THRESH {THRESH:g}\n")
    print("| layer | blocked | pairwise | mean log gate | lowest cumulative log gate in a chunk |\n"
          "|---|---|---|---|---|")
    shares = []
    for i, gs in sorted(gates.items()):
        g = torch.cat(gs)  # [R, T, H, M]
        regimes = chunk_regimes(g, C, THRESH)
        share = ((regimes == BLOCKED).float().mean().item(), (regimes == PAIRWISE).float().mean().item())
        shares.append(share)
        R, T, H, M = g.shape
        low = g[:, : T - T % C].reshape(R, T // C, C, H, M).cumsum(2).amin().item()
        print(f"| {i} | {share[0]:.1%} | {share[1]:.1%} | {g.mean().item():.3f} | {low:.1f} |")
    n = len(shares)
    print(f"\nall layers: {sum(s[0] for s in shares) / n:.1%} of blocks blocked, "
          f"{sum(s[1] for s in shares) / n:.1%} pairwise")
    if args.save:
        layer = next(m for m in model.modules() if isinstance(m, GatedSlotAttention))
        torch.save({"g": torch.stack([gates[i][0][0] for i in sorted(gates)]).to(torch.bfloat16),  # [L, T, H, M]
                    "query_heads": layer.num_heads, "head_dim": layer.head_dim, "model": args.model}, args.save)
        print(f"saved the gates of {len(gates)} layers x {args.seq_len} tokens to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
