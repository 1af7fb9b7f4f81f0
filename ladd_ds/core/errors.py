"""The project's user-facing errors: bad input the user can fix. `ladd-ds` prints their message
in one line and exits with status 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path


class LaddError(Exception):
    """Base of every error whose message tells the user what to change."""


class InputError(LaddError, ValueError):
    """A value in a config, a flag, a prompt or caption file, or a dataset that cannot be used."""


class MissingInputError(LaddError, FileNotFoundError):
    """A file or folder the command needs does not exist (the message names it)."""


class OutputExistsError(LaddError, FileExistsError):
    """The output a command would write exists already (the message says what to do)."""


class NoSpaceError(LaddError, OSError):
    """A write failed because the file system is full (or the user's quota is used up)."""


# Free bytes below which a failed write is taken for a full disk: torch.save's C++ writer reports
# one only as "basic_ios::clear: iostream error" / "file write failed" (a RuntimeError, no errno),
# after it filled the disk to its last blocks.
FULL_DISK_BYTES = 16 * 2**20


def is_disk_full(error: BaseException, path: str | Path) -> bool:
    """Whether `error`, raised while writing under `path`, means that no space is left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(error, RuntimeError) and any(s in str(error) for s in ("iostream error", "file write failed")):
        existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("/"))
        return shutil.disk_usage(existing).free < FULL_DISK_BYTES
    return False


@contextlib.contextmanager
def reporting_full_disk(path: str | Path, what: str) -> Iterator[None]:
    """Turn a failed write under `path` that ran out of space into a NoSpaceError naming `what`
    and `path`; any other error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e, path):
            raise
        raise NoSpaceError(f"{what} {path}: no space left on device; free space and run the same command to resume") from e
