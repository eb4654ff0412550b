"""The ``t2r export`` subcommand: argument parsing only; the work is in :mod:`t2r.export.folder`."""
from __future__ import annotations

import argparse

from ..dtypes import DTYPE_NAMES

DESCRIPTION = """\
Write a Hub-ready folder from a finetune run's output (or one of its checkpoints) or a converted
folder: safetensors weights, config.json with auto_map, the tokenizer, generation_config.json,
the modeling code (so it loads with plain transformers and trust_remote_code=True, t2r not
installed) and a model card. A run that used LoRA is merged by default.

SOURCE may be the Hub id (ORG/NAME) of a converted model: it is downloaded first.
To upload an existing export as it is: t2r export EXPORT_DIR --push-to-hub ORG/NAME
A push (--revision BRANCH, --commit-message MSG) also deletes the repo's files of the kinds an export
holds (weights, modeling code, configs, tokenizer, card) that this export lacks.
"""


def register(subparsers) -> None:
    """Add ``export`` to the ``t2r`` command's subparsers."""
    p = subparsers.add_parser("export", help="write a Hub-ready folder (and push it to the Hub)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run output, checkpoint (OUTPUT/checkpoints/step-N), converted "
                   "folder or its Hub id, or an existing export (to push it)")
    p.add_argument("--out", default=None, help="output folder (written beside, then renamed into place)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="mode", action="store_const", const="merge",
                      help="merge the run's LoRA adapter into the weights (the default when there is one)")
    lora.add_argument("--adapter-only", dest="mode", action="store_const", const="adapter",
                      help="export only the LoRA adapter, to load with peft on top of the converted base")
    p.set_defaults(mode="auto")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="cast the weights (the GSA output norms stay fp32); default: keep the source's")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (default 5GB)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="upload the export (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="with --push-to-hub: push to this branch (made from main if missing); default main")
    p.add_argument("--commit-message", default=None, metavar="MSG", help="with --push-to-hub: the commit's message")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--license", default=None, help="license id for the card (default: the run's record of the "
                   "base model's license)")
    p.add_argument("--eval-results", default=None, metavar="FILE", help="a JSON written by `t2r eval --out`: its "
                   "perplexities and lm-eval accuracies go into the card (model-index metadata and a table)")
    p.add_argument("--base-id", default=None, help="with --adapter-only: Hub id or path of the converted base, "
                   "written as the adapter's base_model_name_or_path")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..errors import T2RError
    from .card_eval import read_eval_results
    from .folder import ExportOptions, export

    if args.private and not args.push_to_hub:
        raise T2RError("--private applies to --push-to-hub; add --push-to-hub ORG/NAME or drop --private")
    if args.base_id and args.mode != "adapter":
        raise T2RError("--base-id names the base of an adapter export; add --adapter-only or drop --base-id")
    options = ExportOptions(mode=args.mode, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            push_to_hub=args.push_to_hub, private=args.private, revision=args.revision,
                            commit_message=args.commit_message, overwrite=args.overwrite,
                            license=args.license, base_id=args.base_id,
                            eval_results=read_eval_results(args.eval_results) if args.eval_results else None)
    export(args.source, args.out, options)
