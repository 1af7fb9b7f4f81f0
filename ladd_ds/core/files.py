"""Atomic directory writes: build a directory under a hidden temporary sibling name, then rename
it into place, so a reader never sees a half-written export, checkpoint, shard part or cache
entry, and a crash leaves only a hidden `.NAME.tmp*` directory that nothing picks up."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ladd_ds.core.errors import OutputExistsError
from ladd_ds.core.outputs import absolute, check_output, write_marker


def temporary_sibling(out: str | Path, unique: bool = True) -> Path:
    """A new, empty hidden directory next to `out` (same filesystem, so the rename is atomic).
    `unique`: a name no other process uses (pid + random); else `.NAME.tmp`, which the caller
    may share between ranks, and which a previous crash's leftovers are cleared from."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp" + (f"-{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ""))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_directory(tmp: Path, out: str | Path, replace: bool = True) -> Path:
    """Rename the finished `tmp` to `out`. An existing `out` is replaced (`replace`), moved aside
    first so that `out` is at every moment either the old or the new directory; without
    `replace` an existing `out` raises FileExistsError and `tmp` is removed."""
    out = Path(out)
    old = None
    if out.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out} already exists")
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_directory(
    out: str | Path, kind: str | None = None, *, source: str | None = None, overwrite: bool = False, option: str = "--out"
) -> Iterator[Path]:
    """`with atomic_directory(out, kind) as tmp:` write into `tmp`; on success it becomes `out`, on
    an exception it is removed and `out` is untouched.

    `kind` (an output kind of ladd_ds.core.outputs): `out` may be replaced only when it holds
    that kind's marker (from the same `source`, or any with `overwrite`); the new folder gets the
    marker. Checked before the first byte is written and again before the rename (a long write
    may meet a folder that appeared meanwhile). Without `kind`, `out` must not exist."""
    out = absolute(out)
    check = functools.partial(check_output, out, kind, source=source, overwrite=overwrite, option=option)
    if kind is None and out.exists():
        raise OutputExistsError(f"{out} already exists; delete it or choose another output path")
    if kind is not None:
        check()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind, source=source)
            check()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_directory(tmp, out, replace=kind is not None)
