"""The ``t2r finetune CONFIG [--output-dir DIR] [--resume] [--set key=value ...]`` subcommand; the work is in
:mod:`t2r.train.loop`."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    """Add ``finetune`` to the ``t2r`` command's subparsers."""
    p = subparsers.add_parser("finetune",
                              help="convert and finetune from a YAML config (runs under accelerate launch too)")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    p.add_argument("--resume", action="store_true", help="continue the run in the output dir from its last checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stages.0.steps=50 --set data.seq_len=512")
    p.set_defaults(func=run)


def run(args) -> int:
    from .config import load_config
    from .loop import RunStopped, finetune

    config = load_config(args.config, args.set or [], args.output_dir)
    try:
        finetune(config, resume=args.resume)
    except RunStopped as e:
        print(f"t2r finetune: {e}", file=sys.stderr)
        return e.exit_code
    return 0
