"""Triton GPU kernels and their torch fallbacks (installed as ``t2r.kernels``)."""

if __name__ == "kernels":
    # This folder was found as a top-level ``kernels`` package: Python runs from the checkout, so the
    # repository root is on sys.path. That name belongs to Hugging Face's ``kernels`` package, which
    # transformers (5.25 and later) imports. Load the installed one in this module's place, if any; t2r itself
    # always imports this folder as ``t2r.kernels``.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:  # without it, this folder stays what `import kernels` gives (transformers then
        _module = importlib.util.module_from_spec(_spec)  # finds no version and treats it as absent)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
