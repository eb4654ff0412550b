"""The ``t2r`` console script, fast on ``--help``.

``import t2r`` loads torch and transformers (t2r/__init__.py registers the model type with transformers, so
that converted folders load with plain ``from_pretrained``), about 3 s. The command line itself needs none of
that, so this entry point, outside the package, creates the ``t2r`` package module without running its
``__init__`` yet, builds and parses the command line (t2r.cli and the subcommands' ``register`` import only
light modules), and only then runs the package's ``__init__``, exactly as ``import t2r`` would have, before the
command runs. ``--help``, ``--version`` and usage errors exit before that. ``python -m t2r.cli`` still works
(it imports the package first, so its ``--help`` is not faster).
"""
from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    if "t2r" in sys.modules:  # imported already (a caller in the same process): nothing to defer
        from t2r.cli import main as cli_main

        return cli_main(argv)
    spec = importlib.util.find_spec("t2r")
    package = importlib.util.module_from_spec(spec)
    sys.modules["t2r"] = package
    try:
        from t2r.cli import build_parser, run

        args = build_parser().parse_args(argv)
    except BaseException:  # --help, --version, a usage error: leave no half-imported t2r behind
        for name in [n for n in sys.modules if n == "t2r" or n.startswith("t2r.")]:
            del sys.modules[name]
        raise
    spec.loader.exec_module(package)  # the rest of `import t2r`: torch, transformers, the model registration
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
