"""One writer per place: a lock file that names its holder (host, pid, start time, command).

A run directory, a dataset being generated and a checkpoint being converted each get one writer at
a time. The lock is a plain file created with O_EXCL, not an flock: cluster file systems (NFS,
Lustre, GPFS) do not all honour flock across nodes, and a file that names its holder lets the
refusal say who holds it. A holder that died without releasing it (SIGKILL, a node crash) leaves
the file behind:
- on this host, its pid is checked: a dead holder's lock (or one whose pid now belongs to a
  process started later) is taken over, and so is one this process left itself;
- on another host nothing can be checked, so the refusal gives the holder and the lock's age and
  names the file to delete once that job is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from ladd_ds.core.errors import LaddError

LOCK_FILE = ".ladd_ds.lock"  # the name of a folder's lock (a run directory, a dataset)


class LockedError(LaddError, RuntimeError):
    """Another live process holds the lock (the message names it and what to do)."""


def _process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None where
    /proc is not there. Tells a live holder from a later process that was given its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def holder_alive(holder: dict) -> bool:
    """Whether a lock's holder still runs. One on another host is taken to (it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = holder.get("start_ticks")
    return started is None or _process_start_ticks(pid) in (None, started)


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("time", time.time()))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("time", 0))))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {started} ({_age(age)} ago): {holder.get('command', '?')}"
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


class FileLock:
    """`with FileLock(path, what="run directory runs/r1"):` or acquire() / release(). Raises
    LockedError when a live process holds it."""

    _holding: set[FileLock] = set()  # every lock this process holds (release_all)

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_ticks": _process_start_ticks(os.getpid()),
            "time": time.time(),
            "command": " ".join(["ladd-ds", *sys.argv[1:]]) if sys.argv else "ladd-ds",
            "token": self.token,
        }

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # being written this instant, or not ours: treated as held, named by its path

    def acquire(self) -> FileLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                if holder is None:
                    continue  # released meanwhile
                if not holder or (holder_alive(holder) and not self._own(holder)):
                    raise LockedError(self._busy_message(holder)) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._record()))
            self.held = True
            FileLock._holding.add(self)
            return self
        raise LockedError(f"could not take {self.path}: other processes keep taking it; try again")

    @staticmethod
    def _own(holder: dict) -> bool:
        """A lock this very process left (a command run in process after another, as the demo and
        the tests do): it is no other writer, and is taken again."""
        return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()

    def _take_over(self, dead: dict) -> None:
        """Remove a dead holder's lock. It is renamed away first and then checked to be that same
        lock: of two processes taking over at once only one renames it, and one that renamed a new
        live holder's lock instead (taken between its read and its rename) puts it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (ValueError, OSError):
            moved = {}
        if moved.get("token") != dead.get("token"):
            try:
                os.link(aside, self.path)  # put the live lock back, unless the place is taken again
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _busy_message(self, holder: dict) -> str:
        if not holder:
            return f"{self.what} is locked by {self.path}, which cannot be read; delete it if no ladd-ds job uses this place"
        where = "" if holder.get("host") == socket.gethostname() else " (another host: its process cannot be checked from here)"
        return (
            f"{self.what} is in use by another ladd-ds process: {describe(holder)}{where}. Wait for it to finish or stop it; "
            f"if that job is gone, delete {self.path}"
        )

    def release(self) -> None:
        """Remove the lock if it is still this process's (a takeover may have replaced it)."""
        if not self.held:
            return
        self.held = False
        FileLock._holding.discard(self)
        holder = self.read_holder()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds: a command's end (ladd_ds.cli.main), also when it
        runs in a process that goes on (the demo's stages, the tests)."""
        for lock in list(cls._holding):
            lock.release()

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
