"""The ``t2r`` command: thin argument parsing over convert / generate / finetune / export."""
from __future__ import annotations

import argparse
import sys

from .hub import ALIASES, T2RError


# Short names kept from earlier releases: flag -> (option, how the value maps)
CONVERSION_ALIASES = {"--slots": "num_slots", "--tau": "gate_logit_normalizer", "--scale": "gsa_scale"}


def _add_conversion_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``ConversionOptions`` field, named as its YAML key (``--num-slots`` ...)."""
    import typing

    from .options import ConversionOptions

    for name, field in ConversionOptions.model_fields.items():
        flags = ["--" + name.replace("_", "-")] + [a for a, n in CONVERSION_ALIASES.items() if n == name]
        ann = field.annotation
        default = f" (default {field.default})" if field.default is not None else ""
        help_text = (field.description or name.replace("_", " ")) + default
        kwargs = {"dest": name, "default": None, "help": help_text}
        if ann is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(ann) is typing.Literal:
            p.add_argument(*flags, choices=typing.get_args(ann), **kwargs)
        elif ann in (int, float) or float in typing.get_args(ann):
            p.add_argument(*flags, type=int if ann is int else float, **kwargs)
        else:
            p.add_argument(*flags, **kwargs)
    p.add_argument("--rope", choices=["keep", "drop"], default=None, help="same as --use-rope / --no-use-rope")


def conversion_options(args):
    """The ConversionOptions of the flags given (the others keep their defaults)."""
    from pydantic import ValidationError

    from .options import ConversionOptions

    given = {n: getattr(args, n) for n in ConversionOptions.model_fields if getattr(args, n, None) is not None}
    if getattr(args, "rope", None) is not None:
        given.setdefault("use_rope", args.rope == "keep")
    try:
        return ConversionOptions(**given)
    except ValidationError as e:
        bad = "; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']} "
                        f"(got {err.get('input')!r})" for err in e.errors())
        raise T2RError(f"bad conversion option: {bad}") from None


def cmd_convert(args) -> None:
    from .convert import convert

    convert(args.model, args.out, conversion_options(args), overwrite=args.overwrite)


def cmd_generate(args) -> None:
    from .generation import check_request, generate_text, load_for_inference

    check_request(args.prompt, args.max_new_tokens, args.temperature)
    model, tokenizer = load_for_inference(args.model_dir, args.device, args.dtype)
    chat, static = ({"auto": None, "on": True, "off": False}[a] for a in (args.chat, args.static))
    _, stats = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat, args.temperature, stream=True,
                             static=static)
    cache = "" if stats["cache_bytes"] is None else f", cache {stats['cache_bytes'] / 2**10:,.0f} KiB"
    print(f"[{stats['prompt_tokens']} prompt tokens, generated {stats['new_tokens']} tokens in "
          f"{stats['seconds']:.2f}s{cache}]", file=sys.stderr)


def _version() -> str:
    """t2r's version without importing the package (the console script defers that: see t2r_launch.py)."""
    version = getattr(sys.modules.get(__package__), "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version("t2r")
        except PackageNotFoundError:
            version = "unknown"
    return version


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Imports only light modules (no torch, transformers, datasets ...): each command
    imports what it needs when it runs, so ``t2r --help`` stays fast."""
    parser = argparse.ArgumentParser(prog="t2r", description="Transformer-to-RNN: convert, finetune, export.")
    parser.add_argument("--version", action="version", version=f"t2r {_version()}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="swap a pretrained model's softmax attention for GSA layers")
    p.add_argument("model", help=f"alias ({', '.join(sorted(ALIASES))}), Hub id, or local folder/.gguf")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_conversion_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a converted model (streams to stdout)")
    p.add_argument("model_dir", metavar="MODEL", help="converted folder, or its Hub id (ORG/NAME; downloaded, or "
                   "read from the cache offline); a teacher alias runs as itself")
    p.add_argument("--prompt", required=True, help="the prompt (wrapped in the chat template as --chat says)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                   help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights' dtype (auto: as saved on cuda, fp32 on cpu)")
    p.add_argument("--static", default="auto", choices=["auto", "on", "off"],
                   help="decode on a static cache: buffers allocated once, each step a CUDA graph on CUDA "
                        "(auto: on CUDA, for t2r models)")
    p.set_defaults(func=cmd_generate)

    from .eval.command import register as register_eval
    from .export import register as register_export
    from .train.cli import register as register_finetune

    register_finetune(sub)
    register_eval(sub)
    register_export(sub)
    return parser


def quiet_transformers() -> None:
    """Turn transformers' own progress bars off (loading weights ...: noise around t2r's output), keeping
    huggingface_hub's download and upload bars as they were: transformers' switch turns those off too."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off = are_progress_bars_disabled()  # HF_HUB_DISABLE_PROGRESS_BARS=1, or the caller's choice
    hf_logging.disable_progress_bar()
    if not hub_bars_off:
        enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; errors of t2r's own print as one line and exit 2."""
    quiet_transformers()
    try:
        code = args.func(args)
    except T2RError as e:
        print(f"t2r {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
