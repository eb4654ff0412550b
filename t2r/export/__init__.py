"""``t2r export``: Hub-ready folders that load with plain transformers, model cards, Hub upload.

    folder.py       the export itself (weights, config, tokenizer, code, card), written atomically
    load.py         reading a SOURCE: run / checkpoint / converted folder, checked, safetensors only
    remote_code.py  flat modeling files generated from t2r's own sources
    card.py         the model card (README.md)
    card_eval.py    `t2r eval` scores in the card: model-index metadata and a table (--eval-results)
    push.py         upload through huggingface_hub
    command.py      the argparse subcommand

Importing this package is cheap (the CLI imports t2r.export.command to register the subcommand).
"""


def export(*args, **kwargs):
    """See :func:`t2r.export.folder.export`."""
    from .folder import export as _export

    return _export(*args, **kwargs)


__all__ = ["export"]
