"""Checks on the folder a command writes (``--out``), made before any model is loaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .hub import T2RError


def check_out_dir(out: Path, overwrite: bool) -> None:
    """``out`` must be a folder or not exist yet, be empty unless ``overwrite``, and be writable:
    a probe file is created and removed in it (or in its nearest existing parent)."""
    if out.exists() and not out.is_dir():
        raise T2RError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise T2RError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise T2RError(f"--out {out} is inside {parent}, which is a file; choose a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".t2r-write-probe-"):
            pass
    except OSError as e:
        raise T2RError(f"--out {out}: cannot write in {parent} ({e.strerror or e}); choose a folder you can "
                       "write to") from None
