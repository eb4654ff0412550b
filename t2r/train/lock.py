"""One run at a time in an output folder: ``OUTPUT/.lock`` holds the pid of the run writing there.

A second ``t2r finetune`` on the same folder while the first is alive is refused (two runs would
log every step twice and overwrite each other's checkpoints); a lock left by a run that died
(its pid no longer exists) is taken over.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import T2RError
from ..paths import pid_alive
from .run_folder import RunFolder


@contextlib.contextmanager
def run_lock(out: Path, enabled: bool = True):
    """Hold ``out/.lock`` for the block (``enabled=False``: other processes of a multi-process run)."""
    if not enabled:
        yield
        return
    lock = RunFolder(out).lock
    try:
        holder = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        holder = 0
    if holder and holder != os.getpid() and pid_alive(holder):
        raise T2RError(f"another t2r finetune (pid {holder}) is writing {out}; wait for it to finish, stop it, or "
                       f"choose another --output-dir (if no such run exists, delete {lock})")
    created = not lock.parent.exists()
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()
            if created and not any(lock.parent.iterdir()):  # a run that failed before writing anything
                lock.parent.rmdir()
