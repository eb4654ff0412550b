"""The folders a command writes (``--out``): checked before any model is loaded, written whole or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import T2RError


def check_out_dir(out: Path, overwrite: bool) -> None:
    """``out`` must be a folder or not exist yet, be empty unless ``overwrite``, and be writable:
    a probe file is created and removed in it (or in its nearest existing parent)."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise T2RError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    check_writable_dir(out)


def check_writable_dir(out: Path, flag: str = "--out") -> None:
    """``out`` is a folder or can become one, and a file can be created in it (or its nearest parent)."""
    if out.exists() and not out.is_dir():
        raise T2RError(f"{flag} {out} is a file; choose a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise T2RError(f"{flag} {out} is inside {parent}, which is a file; choose a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".t2r-write-probe-"):
            pass
    except OSError as e:
        raise T2RError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e}); choose a folder you can "
                       "write to") from None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def _remove_stale_temps(out: Path) -> None:
    """Drop what an interrupted write of ``out`` left beside it (its writer's pid is gone)."""
    for leftover in out.parent.glob(f".{out.name}.t2r-*-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: Path):
    """Write a folder under a temporary name beside ``out``; only when the block succeeds does it
    replace ``out`` (whose old content is removed only then). A failure or a kill never leaves a
    half-written ``out``, and the next write removes the temporary folder a killed one left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.t2r-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # empty, or --overwrite: swap, then drop the old one
            old = out.parent / f".{out.name}.t2r-old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
