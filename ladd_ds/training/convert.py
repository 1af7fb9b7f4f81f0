"""Converting a checkpoint for another world size: DeepSpeed's universal format, as its own step.

A checkpoint is written as one ZeRO partition per rank; a run on another number of ranks loads
it through DeepSpeed's universal format (`ds_to_universal`), which regroups the optimizer state
per parameter. For an 8B run that is ~100 GB to read and write, which can take longer than the
process group's collective time-out (30 minutes), so it never runs inside a collective:

- `ladd-ds convert-checkpoint --run DIR` converts in one process, with no process group;
- a training run that needs the conversion runs the same function on rank 0, while the other
  ranks wait for it on the file system (polling, no time-out), not at a barrier.

The work is resumable: each engine is converted into CHECKPOINT/.universal.tmp/<engine>/ and
renamed into place when complete; an interrupted conversion restarts at the first engine not yet
done, and CHECKPOINT/universal/ appears (renamed) only when every engine is converted. A lock file
(CHECKPOINT/.universal.lock, ladd_ds.core.lock) keeps two processes from converting at once; a
lock whose process on this host is gone is taken over. `ladd-ds convert-checkpoint` also holds
the run directory's lock: it does not convert while a training job runs there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ladd_ds.core.errors import InputError
from ladd_ds.core.lock import LOCK_FILE, FileLock, LockedError, describe, holder_alive
from ladd_ds.core.outputs import absolute
from ladd_ds.distributed.ranks import barrier, is_main, print0
from ladd_ds.training.checkpoint import UNIVERSAL_DIR, read_trainer_state
from ladd_ds.training.export import find_checkpoint

STAGING = ".universal.tmp"
LOCK = ".universal.lock"
FAILED = ".universal.failed"
RECORD = "conversion.json"  # in universal/: bytes, seconds, per engine
POLL_S = 2.0
REPORT_EVERY_S = 300.0


class ConversionBusy(InputError):
    """Another live process holds the conversion lock."""


def is_converted(checkpoint: Path) -> bool:
    """Whether CHECKPOINT/universal/ holds a finished conversion. A universal/ folder without the
    conversion's record was not written here: it is refused, never used or replaced."""
    universal = Path(checkpoint) / UNIVERSAL_DIR
    if (universal / RECORD).is_file():
        return True
    if universal.exists():
        raise InputError(
            f"{universal} was not written by ladd-ds convert-checkpoint (it has no {RECORD}); "
            "move it out of the checkpoint, then run the command again"
        )
    return False


def _lock(checkpoint: Path) -> FileLock:
    return FileLock(Path(checkpoint) / LOCK, f"the conversion of {checkpoint}")


def _take_lock(checkpoint: Path) -> FileLock:
    try:
        return _lock(checkpoint).acquire()
    except LockedError as e:
        raise ConversionBusy(str(e)) from None


def engine_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def convert_to_universal(checkpoint: Path, engines: list[str], log=print) -> dict | None:
    """Convert the engines' ZeRO checkpoints in `checkpoint` to the universal format, resuming an
    interrupted conversion; returns the record of this conversion (also written to
    universal/conversion.json), or None when it was converted already. Raises ConversionBusy when
    another live process is converting it. Any other failure is recorded in CHECKPOINT/.universal.failed
    for the ranks that wait on it."""
    checkpoint = Path(checkpoint)
    if is_converted(checkpoint):
        return None
    lock = _take_lock(checkpoint)
    try:
        (checkpoint / FAILED).unlink(missing_ok=True)
        record = _convert(checkpoint, engines, log)
    except BaseException as e:
        (checkpoint / FAILED).write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        lock.release()
    return record


def _convert(checkpoint: Path, engines: list[str], log) -> dict:
    staging = checkpoint / STAGING
    staging.mkdir(exist_ok=True)
    record = {"engines": {}, "bytes": 0, "seconds": 0.0}
    for name in engines:
        done = staging / name
        if done.is_dir():
            log(f"convert-checkpoint: {name}: already converted (an earlier attempt), kept")
            continue
        size = engine_bytes(checkpoint / name)
        log(f"convert-checkpoint: {name}: {size / 2**30:.2f} GiB of ZeRO partitions -> universal ...")
        start = time.monotonic()
        _run_ds_to_universal(checkpoint / name, staging, name)
        seconds = time.monotonic() - start
        record["engines"][name] = {"bytes": size, "seconds": round(seconds, 3)}
        record["bytes"] += size
        record["seconds"] += seconds
        log(f"convert-checkpoint: {name}: done in {seconds:.1f} s")
    record["seconds"] = round(record["seconds"], 3)
    if record["bytes"]:
        record["seconds_per_gib"] = round(record["seconds"] / (record["bytes"] / 2**30), 3)
    (staging / RECORD).write_text(json.dumps(record, indent=2))
    staging.rename(checkpoint / UNIVERSAL_DIR)
    return record


def _run_ds_to_universal(source: Path, staging: Path, name: str) -> None:
    """One engine into staging/<name>/, through a hidden partial folder renamed when complete."""
    partial = staging / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source)]
    cmd += ["--output_folder", str(partial)]
    # ZeRO-1/2 checkpoints lack the universal-info block that Megatron-style clients add; for plain
    # (no tensor/pipeline parallel) models the default block is correct.
    cmd += ["--inject_missing_state"]
    log_file = staging / f"{name}.log"
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"converting {source} to a universal checkpoint failed (log: {log_file}):\n{tail}")
    partial.rename(staging / name)


def wait_for_conversion(checkpoint: Path, log=print, poll_s: float = POLL_S) -> None:
    """Block until `checkpoint` is converted (by rank 0 or by a separate convert-checkpoint), with
    no time-out; raise if the converting process recorded a failure."""
    checkpoint = Path(checkpoint)
    started = last_report = time.monotonic()
    while not is_converted(checkpoint):
        failed, owner = checkpoint / FAILED, _lock(checkpoint).read_holder()
        if failed.is_file() and not (checkpoint / LOCK).exists():
            raise RuntimeError(f"converting {checkpoint} for this world size failed: {failed.read_text().strip()}")
        if owner and not holder_alive(owner):
            raise RuntimeError(
                f"the process converting {checkpoint} ({describe(owner)}) is gone; run "
                "`ladd-ds convert-checkpoint --run RUN_DIR` (it resumes the conversion), then start the run again"
            )
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            by = f" by {describe(owner)}" if owner else ""
            log(f"waiting for the conversion of {checkpoint}{by}: {time.monotonic() - started:.0f} s so far")
            last_report = time.monotonic()
        time.sleep(poll_s)


def convert_for_world_size(checkpoint: Path, engines: list[str]) -> None:
    """Collective, in a run whose world size differs from the checkpoint's: rank 0 converts
    (unless another process already does; then every rank waits for that one), the other ranks
    wait on the file system. Only two quick barriers, none around the conversion itself."""

    if is_converted(checkpoint):
        return
    if is_main():
        (Path(checkpoint) / FAILED).unlink(missing_ok=True)  # an earlier attempt's
    barrier()
    if is_main():
        try:
            record = convert_to_universal(checkpoint, engines, log=print0)
            if record and record["bytes"]:
                print0(
                    f"converted {record['bytes'] / 2**30:.2f} GiB in {record['seconds']:.1f} s "
                    f"({record['seconds_per_gib']:.1f} s per GiB)"
                )
        except ConversionBusy as e:
            print0(f"{e}: waiting for it")
    wait_for_conversion(checkpoint, log=print0)
    barrier()


def convert_run(run_dir: Path, step: int | None = None) -> Path:
    """`ladd-ds convert-checkpoint`: convert a run's checkpoint (default: the latest) for any
    world size, in this process; the run's next start on another world size loads it at once."""

    checkpoint = find_checkpoint(Path(run_dir), step)
    # One writer per run directory: not while a training job (or another conversion) runs in it.
    with FileLock(Path(run_dir) / LOCK_FILE, f"run directory {absolute(run_dir)}"):
        return _convert_run(checkpoint)


def _convert_run(checkpoint: Path) -> Path:
    state = read_trainer_state(checkpoint)
    engines = trainable_engines(checkpoint)
    if is_converted(checkpoint):
        print(f"{checkpoint} is converted already ({checkpoint / UNIVERSAL_DIR}): nothing to do")
        return checkpoint / UNIVERSAL_DIR
    print(f"{checkpoint}: step {state['step']}, written by {state['world_size']} ranks; engines {engines}")
    record = convert_to_universal(checkpoint, engines)
    print(
        f"converted {record['bytes'] / 2**30:.3f} GiB in {record['seconds']:.1f} s "
        f"({record.get('seconds_per_gib', 0.0):.1f} s per GiB) into {checkpoint / UNIVERSAL_DIR}"
    )
    return checkpoint / UNIVERSAL_DIR


def trainable_engines(checkpoint: Path) -> list[str]:
    """The engines a checkpoint holds: its sub-folders with DeepSpeed model-state files."""
    return sorted(d.name for d in Path(checkpoint).iterdir() if d.is_dir() and any(d.glob("*model_states.pt")))
