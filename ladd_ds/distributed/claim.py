"""Claiming an output folder for one job: rank 0 checks what is there, creates the folder, takes its
lock and marks it; every rank raises the same error when it cannot (a run directory:
training/run_dir.py; a dataset of synth, encode or pairs: generate/dataset.py)."""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path

from ladd_ds.core.errors import LaddError
from ladd_ds.core.lock import LOCK_FILE, FileLock
from ladd_ds.core.outputs import OUTPUT_MARKER, absolute, write_marker
from ladd_ds.distributed.ranks import broadcast_object, is_main


def claim_folder(
    folder: str | Path, check: Callable[[Path], object], *, kind: str, source: str | None, what: str
) -> FileLock | None:
    """Collective. `check(folder)` raises a LaddError when the folder may not be written; then the
    folder is created, FOLDER/LOCK_FILE taken (released at exit at the latest) and the marker
    of `kind` written when missing. Returns the held lock on rank 0, None on the other ranks."""
    folder = absolute(folder)
    lock, error = None, None
    if is_main():
        try:
            check(folder)
            folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(folder / LOCK_FILE, f"{what} {folder}").acquire()
            atexit.register(lock.release)
            if not (folder / OUTPUT_MARKER).is_file():
                write_marker(folder, kind, source=source)
        except LaddError as e:
            error = e
    error = broadcast_object(error)  # the same error on every rank (exceptions pickle)
    if error is not None:
        raise error
    return lock
