"""The ``t2r generate`` subcommand: argument parsing only; the work is in :mod:`t2r.generation`."""
from __future__ import annotations

import sys

from .dtypes import DTYPE_CHOICES, LOADING_HELP


def register(subparsers) -> None:
    """Add ``generate`` to the ``t2r`` command's subparsers."""
    p = subparsers.add_parser("generate", help="generate text from a converted model (streams to stdout)")
    p.add_argument("model_dir", metavar="MODEL", help="converted folder, or its Hub id (ORG/NAME; downloaded, or "
                   "read from the cache offline); a teacher alias runs as itself")
    p.add_argument("--prompt", required=True, help="the prompt (wrapped in the chat template as --chat says)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                   help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help=LOADING_HELP)
    p.add_argument("--static", default="auto", choices=["auto", "on", "off"],
                   help="decode on a static cache: buffers allocated once, each step a CUDA graph on CUDA "
                        "(auto: on CUDA, for t2r models; default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> None:
    from .generation import check_request, generate_text, load_for_inference

    check_request(args.prompt, args.max_new_tokens, args.temperature)
    model, tokenizer = load_for_inference(args.model_dir, args.device, args.dtype)
    chat, static = ({"auto": None, "on": True, "off": False}[a] for a in (args.chat, args.static))
    _, stats = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat, args.temperature, stream=True,
                             static=static)
    cache = "" if stats["cache_bytes"] is None else f", cache {stats['cache_bytes'] / 2**10:,.0f} KiB"
    print(f"[{stats['prompt_tokens']} prompt tokens, generated {stats['new_tokens']} tokens in "
          f"{stats['seconds']:.2f}s{cache}]", file=sys.stderr)
