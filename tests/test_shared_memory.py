"""Stale shared memory is cleaned without touching a live job's (ladd_ds/data/shared_memory.py)."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from ladd_ds.data import loader
from ladd_ds.data.shared_memory import SHM_DIR, clean_stale_blocks, paths_in_use

pytestmark = pytest.mark.skipif(paths_in_use() is None, reason="needs /proc (Linux)")


def test_blocks_are_judged_by_prefix_and_use(tmp_path):
    shm, locks = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), locks.mkdir()
    names = [
        "000001_locals",  # live prefix: its locals is mapped ...
        "000001_epoch_shape",  # ... so its short-lived blocks stay too
        "000002_locals",  # ended job
        "000002_barrier",
        "deepspeed_allreduce_buffer_0_127.0.0.1_29500_0",  # live
        "deepspeed_allreduce_buffer_0_127.0.0.1_29511_1",  # ended
        "123456_unrelated",  # not streaming's: never touched
    ]
    for name in names:
        (shm / name).write_bytes(b"x")
    for name in ["000001_barrier_filelock", "000002_barrier_filelock", "000003_cache_filelock"]:
        (locks / name).write_bytes(b"")
    in_use = {str(shm / "000001_locals"), str(shm / names[4])}

    report = clean_stale_blocks(shm, locks, in_use)

    assert sorted(p.name for p in shm.iterdir()) == sorted(["000001_locals", "000001_epoch_shape", names[4], "123456_unrelated"])
    assert sorted(p.name for p in locks.iterdir()) == ["000001_barrier_filelock"]
    assert sorted(report.removed) == sorted(
        ["000002_locals", "000002_barrier", names[5], "000002_barrier_filelock", "000003_cache_filelock"]
    )


def _free_prefix() -> int:
    taken = {int(p.name[:6]) for p in SHM_DIR.iterdir() if p.name[:6].isdigit()}
    return next(i for i in range(1_000_000) if i not in taken and i + 1 not in taken)


@pytest.mark.parametrize("mode, live_kept", [("stale", True), ("all", False), ("off", True)])
def test_another_live_job_keeps_its_shared_memory(tmp_path, monkeypatch, mode, live_kept):
    """Another process holds a streaming block (as a running job on the node does); a killed one
    left the next prefix behind with its lock file. The default clean-up removes only the latter;
    streaming's unconditional one ("all", explicit) removes both."""
    prefix = _free_prefix()
    if mode == "all" and prefix != 0:
        pytest.skip("streaming's clean-up would also unlink the blocks of other datasets on this machine")
    live, stale = SHM_DIR / f"{prefix:06}_locals", SHM_DIR / f"{prefix + 1:06}_locals"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom multiprocessing.shared_memory import SharedMemory\n"
            f"m = SharedMemory('{live.name}', create=True, size=64)\nprint('ready', flush=True)\n"
            "sys.stdin.read()\nm.close()\ntry:\n    m.unlink()\nexcept FileNotFoundError:\n    pass",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        stale.write_bytes(b"\0" * 64)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        stale_lock = tmp_path / f"{prefix + 1:06}_barrier_filelock"
        stale_lock.write_bytes(b"")
        monkeypatch.setattr(loader, "_shared_memory_cleaned", False)

        loader.clean_stale_shared_memory_once(mode)

        assert live.exists() == live_kept
        assert stale.exists() == (mode == "off")
        if mode == "stale":
            assert not stale_lock.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        stale.unlink(missing_ok=True)
