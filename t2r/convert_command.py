"""The ``t2r convert`` subcommand: its flags, one per ``ConversionOptions`` field; the work is in
:mod:`t2r.convert`."""
from __future__ import annotations

import argparse

from .errors import T2RError
from .hub import ALIASES

# Short names kept from earlier releases: flag -> the option it sets
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


def register(subparsers) -> None:
    """Add ``convert`` to the ``t2r`` command's subparsers."""
    p = subparsers.add_parser("convert", help="swap a pretrained model's softmax attention for GSA layers")
    p.add_argument("model", help=f"alias ({', '.join(sorted(ALIASES))}), Hub id, or local folder/.gguf")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_conversion_flags(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from .convert import convert

    convert(args.model, args.out, conversion_options(args), overwrite=args.overwrite)
