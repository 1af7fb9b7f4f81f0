"""Cleaning the shared memory that crashed jobs leave behind, without touching live jobs.

mosaicml-streaming keeps each dataset's state in POSIX shared memory named ``<prefix>_<kind>``
(``000003_locals``, ``000003_barrier``, ...) plus lock files ``<prefix>_barrier_filelock`` in the
temporary directory; DeepSpeed's CPU all-reduce keeps ``deepspeed_allreduce_buffer_*`` blocks. A
killed process never unlinks them. streaming's own ``clean_stale_shared_memory`` unlinks *every*
such block, including those of another job running on the same node, which then fails.

Here a block is stale only when no process on the machine maps it or holds it open (read from
``/proc/<pid>/maps`` and ``/proc/<pid>/fd``); all blocks of one streaming prefix are judged
together, since some live only briefly between two ranks. Where ``/proc`` cannot be read, nothing
is cleaned unless the run asks for streaming's unconditional clean-up explicitly
(``data.shared_memory_cleanup: all``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
from streaming.base.util import clean_stale_shared_memory

SHM_DIR = Path("/dev/shm")
STREAMING_BLOCK = re.compile(r"^(\d{6})_(" + "|".join(SHM_TO_CLEAN) + r")$")
DEEPSPEED_BLOCK = re.compile(r"^deepspeed_allreduce_buffer_")
LOCK_FILES = (BARRIER_FILELOCK, CACHE_FILELOCK)


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)  # block and lock file names
    kept_live: list[str] = field(default_factory=list)  # blocks some process still uses
    skipped: str | None = None  # why nothing was looked at


def paths_in_use() -> set[str] | None:
    """Every file under /dev/shm or the temporary directory that some process maps or holds open,
    or None where /proc is not available (not Linux). Processes we may not inspect (another
    user's) are passed over: their blocks belong to that user and we could not unlink them."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").is_file():
        return None
    used: set[str] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for line in (pid_dir / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    used.add(parts[5].removesuffix(" (deleted)"))
            for fd in (pid_dir / "fd").iterdir():
                used.add(os.readlink(fd))
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue  # the process ended meanwhile, or is not ours
    return used


def _unlink(path: Path, report: CleanupReport) -> None:
    try:
        path.unlink()
        report.removed.append(path.name)
    except FileNotFoundError:
        pass  # another cleaner was faster
    except PermissionError:
        report.kept_live.append(path.name)  # not ours


def clean_stale_blocks(shm_dir: Path = SHM_DIR, lock_dir: Path | None = None, in_use: set[str] | None = None) -> CleanupReport:
    """Unlink the streaming and DeepSpeed shared-memory blocks no process uses, and the lock files
    of the streaming prefixes that are gone. `in_use` (default: read from /proc) names the paths
    some process maps or holds open; `shm_dir` and `lock_dir` are parameters for tests."""
    report = CleanupReport()
    in_use = paths_in_use() if in_use is None else in_use
    if in_use is None:
        report.skipped = "/proc is not readable here: cannot tell stale shared memory from a live job's"
        return report
    if not shm_dir.is_dir():
        report.skipped = f"{shm_dir} does not exist"
        return report
    lock_dir = Path(tempfile.gettempdir()) if lock_dir is None else lock_dir
    prefixes: dict[str, list[Path]] = {}
    for path in shm_dir.iterdir():
        match = STREAMING_BLOCK.match(path.name)
        if match:
            prefixes.setdefault(match.group(1), []).append(path)
        elif DEEPSPEED_BLOCK.match(path.name):
            if str(path) in in_use:
                report.kept_live.append(path.name)
            else:
                _unlink(path, report)
    for prefix, blocks in sorted(prefixes.items()):
        if any(str(b) in in_use for b in blocks):
            report.kept_live.extend(sorted(b.name for b in blocks))
            continue
        for block in blocks:
            _unlink(block, report)
    # Lock files whose prefix has no block left make streaming skip that prefix for good.
    live_prefixes = {p for p, blocks in prefixes.items() if any(str(b) in in_use for b in blocks)}
    for kind in LOCK_FILES:
        for lock in lock_dir.glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]_{kind}"):
            prefix = lock.name[:6]
            if prefix not in live_prefixes and str(lock) not in in_use:
                _unlink(lock, report)
    return report


def clean_all_streaming_blocks() -> None:
    """streaming's unconditional clean-up: every streaming block on the node, live or not. Only on
    explicit request (data.shared_memory_cleanup: all), for a node this job has to itself."""

    clean_stale_shared_memory()
