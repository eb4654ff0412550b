"""The ``t2r`` command: thin argument parsing over convert / generate / finetune / export."""
from __future__ import annotations

import argparse
import sys

from .hub import ALIASES, T2RError


def _add_conversion_flags(p: argparse.ArgumentParser) -> None:
    from .convert import ConversionOptions

    d = ConversionOptions()
    p.add_argument("--slots", type=int, default=d.num_slots, help="memory slots per kv head (default %(default)s)")
    p.add_argument("--tau", type=float, default=d.gate_logit_normalizer,
                   help="gate logit normalizer: g = logsigmoid(f_proj(x)) / tau (default %(default)s)")
    p.add_argument("--feature-map", default=d.feature_map, choices=["swish", "relu", "identity", "elu1"],
                   help="feature map on q and k (default %(default)s)")
    p.add_argument("--rope", default="drop", choices=["keep", "drop"], help="RoPE in GSA layers (default drop)")
    p.add_argument("--scale", type=float, default=None,
                   help="logit scale (default 1.0 with swish, head_dim^-0.5 otherwise)")
    p.add_argument("--v-activation", default=d.v_activation, choices=["silu", "identity"])
    p.add_argument("--no-output-norm", action="store_true", help="o_proj(o) instead of o_proj(RMSNorm(silu(o)))")
    p.add_argument("--softmax-layers", default="none",
                   help="layers kept as softmax attention (a hybrid): 'none', 'all' or e.g. '0,8-11'")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0, help="seed for the new gate weights")


def conversion_options(args):
    from .convert import ConversionOptions

    return ConversionOptions(
        num_slots=args.slots, gate_logit_normalizer=args.tau, feature_map=args.feature_map,
        use_rope=args.rope == "keep", gsa_scale=args.scale, v_activation=args.v_activation,
        output_norm=not args.no_output_norm, softmax_layers=args.softmax_layers, dtype=args.dtype, seed=args.seed,
    )


def cmd_convert(args) -> None:
    from .convert import convert

    convert(args.model, args.out, conversion_options(args), overwrite=args.overwrite)


def cmd_generate(args) -> None:
    from .generation import generate_text, load_for_inference

    model, tokenizer = load_for_inference(args.model_dir, args.device, args.dtype)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    _, stats = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat, args.temperature, stream=True)
    cache = "" if stats["cache_bytes"] is None else f", cache {stats['cache_bytes'] / 2**10:,.0f} KiB"
    print(f"[{stats['prompt_tokens']} prompt tokens, generated {stats['new_tokens']} tokens in "
          f"{stats['seconds']:.2f}s{cache}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2r", description="Transformer-to-RNN: convert, finetune, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="swap a pretrained model's softmax attention for GSA layers")
    p.add_argument("model", help=f"alias ({', '.join(sorted(ALIASES))}), Hub id, or local folder/.gguf")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_conversion_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a converted folder (streams to stdout)")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                   help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_generate)

    from .export import register as register_export
    from .train.cli import register as register_finetune

    register_finetune(sub)
    register_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        code = args.func(args)
    except T2RError as e:
        print(f"t2r {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
