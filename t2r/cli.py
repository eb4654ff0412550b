"""The ``t2r`` command: the subcommands of :data:`COMMANDS` under one parser, and their one-line errors."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import T2RError

# The subcommands, in the order `t2r --help` lists them. Each module, beside the code it runs, has
# ``register(subparsers)``: it adds its parser and sets ``func``, its handler. Registering imports only light
# modules (no torch, transformers, datasets ...): each handler imports what it needs when it runs.
COMMANDS = ("convert_command", "generate_command", "train.command", "eval.command", "export.command")


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
    """The whole command line, built without torch, so that ``t2r --help`` stays fast."""
    parser = argparse.ArgumentParser(prog="t2r", description="Transformer-to-RNN: convert, finetune, export.")
    parser.add_argument("--version", action="version", version=f"t2r {_version()}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __package__).register(sub)
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
